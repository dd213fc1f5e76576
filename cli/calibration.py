"""``lidcseg cityscapes prepare``, ``lidcseg scenes make`` and ``lidcseg calibration``: the flip task."""

from __future__ import annotations

from pathlib import Path

import typer

from lidcseg_cli._common import (
    console,
    one_line_errors,
    parse_counts,
    report_cleanup,
    stage_progress,
)

cityscapes_app = typer.Typer(help="Cityscapes for the flip task (Section 4.2).", no_args_is_help=True)
scenes_app = typer.Typer(help="Synthetic street scenes for the flip task.", no_args_is_help=True)


def _size(text: str) -> tuple[int, int]:
    from lidcseg.errors import LidcsegError

    h, sep, w = text.lower().partition("x")
    try:
        if not sep:
            raise ValueError(text)
        height, width = int(h), int(w)
    except ValueError:
        raise LidcsegError(f"--size expects HEIGHTxWIDTH like 256x512, got {text!r}") from None
    if height < 1 or width < 1:
        raise LidcsegError(f"--size must be positive, got {text!r}")
    return height, width


@cityscapes_app.command("prepare")
@one_line_errors
def cityscapes_prepare(
    root: Path = typer.Option(..., "--root", help="Folder with leftImg8bit/ and gtFine/ (the official layout)."),
    out: Path = typer.Option(..., "--out", help="Data folder to write: train/val/test.h5 and manifest.json."),
    size: str = typer.Option("256x512", "--size", help="Output HEIGHTxWIDTH (paper: 256x512)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes decoding PNGs."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a data folder this command wrote (any other folder is refused)."
    ),
) -> None:
    """Cityscapes -> flip-task scenes: official val = test, darmstadt/monchengladbach/ulm = val."""
    from lidcseg.data.cityscapes import prepare_cityscapes

    height, width = _size(size)
    with stage_progress() as update:
        manifest = prepare_cityscapes(root, out, height=height, width=width, workers=workers,
                                      overwrite=overwrite, progress=update)
    c = manifest["counts"]
    console.print(f"{sum(c.values())} frames: train {c['train']} / val {c['val']} / test {c['test']} "
                  f"({height}x{width}) in {out}")


@scenes_app.command("make")
@one_line_errors
def scenes_make(
    out: Path = typer.Option(..., "--out", help="Data folder to write: train/val/test.h5 and manifest.json."),
    n_train: int = typer.Option(400, "--n-train", min=1, help="Training scenes."),
    n_val: int = typer.Option(50, "--n-val", min=1, help="Validation scenes."),
    n_test: int = typer.Option(100, "--n-test", min=1, help="Test scenes."),
    size: str = typer.Option("32x64", "--size", help="HEIGHTxWIDTH, multiples of 16 (Cityscapes: 256x512)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the scenes."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a data folder this command wrote (any other folder is refused)."
    ),
) -> None:
    """Synthetic street scenes with the Cityscapes classes (the same five flips apply in training)."""
    from lidcseg.data.scenes import make_scenes

    height, width = _size(size)
    with stage_progress() as update:
        manifest = make_scenes(out, n_train=n_train, n_val=n_val, n_test=n_test, height=height,
                               width=width, seed=seed, overwrite=overwrite, progress=update)
    report_cleanup(manifest)
    c = manifest["counts"]
    console.print(f"{sum(c.values())} scenes: train {c['train']} / val {c['val']} / test {c['test']} "
                  f"({height}x{width}, seed {seed}) in {out}")


@one_line_errors
def calibration(
    data: Path = typer.Option(..., "--data", help="A flip-task data folder (scenes make / cityscapes prepare)."),
    out: Path = typer.Option(..., "--out", help="Report folder (new, empty, or one `lidcseg calibration` wrote; its report files are replaced): calibration.md/.json, ged/modes/marginals/examples.png."),
    run: list[Path] = typer.Option(None, "--run", help="A `lidcseg train` run (refit/, else best/, else last/) or a checkpoint folder. Repeatable."),
    n: str = typer.Option("1,4,8,16", "-n", "--n", help="Sample counts of the GED (each the first n samples)."),
    samples: int = typer.Option(16, "--samples", min=1, help="Samples per scene for mode frequencies and marginals."),
    split: str = typer.Option("test", "--split", help="Split to evaluate."),
    oracle: bool = typer.Option(False, "--oracle", help="Add a model that samples the true distribution (the floor)."),
    mode_scenes: str = typer.Option("all", "--mode-scenes", help="Scenes of the mode frequencies: all (the authors' rule, App. C) or complete (only scenes with all five switchable classes)."),
    min_pixels: int = typer.Option(1, "--min-pixels", min=1, help="Pixels each switchable class needs to count as present (--mode-scenes complete, posterior check)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the latent noise (the same for every run)."),
    max_images: int = typer.Option(None, "--max-images", min=1, help="At most this many scenes, evenly spaced."),
    examples: int = typer.Option(3, "--examples", min=0, help="Scenes in examples.png (0: none)."),
    posterior_scenes: int = typer.Option(20, "--posterior-scenes", min=0, help="Scenes for the check of which flips a Prob. U-Net's posterior encodes and where its decoder splits them (0: skip)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Scenes per model call."),
    threads: int = typer.Option(0, "--threads", min=0, help="Torch CPU threads (0: torch's default)."),
) -> None:
    """Calibration on the flip task: GED vs the exact mixture (Eq. 7), mode frequencies, pixel marginals."""
    from lidcseg.calibration import calibrate_runs
    from lidcseg.metrics.flips import PAPER_GED
    from lidcseg.reports.tables import fmt

    counts = parse_counts(n)
    with stage_progress() as update:
        report = calibrate_runs(data, run or [], out, split=split, counts=counts, samples=samples,
                                seed=seed, device=device, batch_size=batch_size, max_images=max_images,
                                oracle=oracle, min_pixels=min_pixels, mode_scenes=mode_scenes,
                                examples=examples, posterior_scenes=posterior_scenes, threads=threads,
                                progress=update)
    shown = sorted(set(counts))
    console.print("GED (Eq. 7) at " + " / ".join(str(c) for c in shown)
                  + f" samples; mode frequencies over {mode_scenes} scenes:")
    for r in report["runs"]:
        console.print(f"  {r['label']}: " + " / ".join(fmt(r["ged"][str(c)]["mean"]) for c in shown)
                      + f"  | modes r {fmt(r['modes']['pearson_r'])}, MAE {fmt(r['modes']['mae'], 4)}"
                      + f" | pixel marginals MAE {fmt(r['pixels']['mae'], 4)}")
        if r.get("posterior"):
            acc = ", ".join(f"{p['class']} {fmt(p['accuracy'], 2)}" for p in r["posterior"]["per_switch"])
            console.print(f"    posterior encodes: {acc}")
        if r.get("geometry"):
            off = ", ".join(f"{p['class']} {p['boundary'] - p['quantile']:+.2f}" for p in r["geometry"]["per_switch"])
            console.print(f"    flip boundary - quantile (prior sd; > 0 under-samples): {off}")
    console.print("  paper Prob. U-Net (Table 2): "
                  + " / ".join(fmt(PAPER_GED[c]) if c in PAPER_GED else "-" for c in shown))
    console.print(f"wrote {out}/calibration.md, calibration.json, ged.png, modes.png, marginals.png"
                  + (", examples.png" if examples else "") + f" ({report['data']['scenes']} scenes)")
