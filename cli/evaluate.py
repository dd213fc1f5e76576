"""``lidcseg evaluate``, ``lidcseg ambiguity`` and ``lidcseg latent``: reports of trained runs."""

from __future__ import annotations

from pathlib import Path

import typer

from lidcseg_cli._common import console, one_line_errors, parse_counts, stage_progress

RUN_HELP = "A `lidcseg train` run directory (refit/, else best/, else last/) or a checkpoint folder. Repeatable."


@one_line_errors
def evaluate(
    data: Path = typer.Option(..., "--data", help="Folder with the split files of `lidcseg prepare`."),
    run: list[Path] = typer.Option(..., "--run", help=RUN_HELP),
    out: Path = typer.Option(..., "--out", help="Report folder (new, empty, or one `lidcseg evaluate` wrote; its report files are replaced): summary.md/.json, per_image.csv, ged.png, examples.png."),
    split: str = typer.Option("test", "--split", help="Split to evaluate (DATA/<split>.h5)."),
    n: str = typer.Option("1,4,8,16", "-n", "--n", help="Sample counts; each uses the first n of max(n) samples per image (ensembles: n members; M-Heads: see --m-heads)."),
    m_heads: str = typer.Option("matched", "--m-heads", help="matched: all M-Heads runs form one row, n scored with the run of n heads (Section 3.2; n = 1 without a 1-head run: the first head of the smallest); prefix: each M-Heads run its own row, its first n heads (not the paper's)."),
    unbiased: bool = typer.Option(False, "--unbiased", help="U-statistic GED and diversity (default: V-statistic, as published)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the latent noise (the same for every run)."),
    examples: int = typer.Option(6, "--examples", min=0, help="Crops with grader disagreement in examples.png (0: none)."),
    max_images: int = typer.Option(None, "--max-images", min=1, help="Evaluate at most this many crops, evenly spaced."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per model call."),
    threads: int = typer.Option(0, "--threads", min=0, help="Torch CPU threads (0: torch's default)."),
) -> None:
    """GED, sample diversity and Hungarian-matched IoU per image of one or more runs (Fig. 4)."""
    from lidcseg.evaluation import evaluate_runs
    from lidcseg.reports.tables import fmt
    from lidcseg.resources import check_pairwise

    counts = parse_counts(n)
    check_pairwise(batch_size, max(counts))  # before anything is opened
    with stage_progress() as update:
        ev = evaluate_runs(data, run, split=split, counts=counts, out=out, seed=seed, unbiased=unbiased,
                           device=device, batch_size=batch_size, max_images=max_images,
                           examples=examples, threads=threads, m_heads=m_heads, progress=update)
    top = max(ev.counts)
    for r in ev.results:
        console.print(f"{r.label} ({r.model}): GED@{top} {fmt(float(r.values('ged', top).mean()))}, "
                      f"diversity {fmt(float(r.values('diversity', top).mean()))}, "
                      f"HM-IoU {fmt(float(r.values('hm_iou', top).mean()))} ({r.time_s:.1f} s)")
        if r.sampling == "model-per-count":
            console.print("  " + "; ".join(f"n = {k}: {s['run']}, {s['uses']}" for k, s in r.sources.items()))
    for t in ev.comparisons:
        console.print(f"Wilcoxon {t['metric']}@{t['n']} {t['other']} vs {t['reference']}: "
                      f"p = {t['p_value']:.3g}")
    console.print(f"wrote {out}/summary.md, summary.json, per_image.csv, ged.png"
                  + (", examples.png" if ev.examples else "") + f" ({len(ev.split)} images)")


@one_line_errors
def ambiguity(
    data: Path = typer.Option(..., "--data", help="Folder with the val and test split files."),
    run: list[Path] = typer.Option(..., "--run", help=RUN_HELP),
    out: Path = typer.Option(..., "--out", help="Report folder (new, empty, or one `lidcseg ambiguity` wrote; its report files are replaced): ambiguity.md/.json, per_crop.csv, histograms.png."),
    n: int = typer.Option(16, "-n", "--n", min=1, help="Samples per crop."),
    min_pixels: int = typer.Option(1, "--min-pixels", min=1, help="Foreground pixels for a sample to show a lesion."),
    criterion: str = typer.Option("accuracy", "--criterion", help="Threshold choice on val: accuracy (the paper's, App. E) or balanced (balanced accuracy: always answering the majority class scores 0.5)."),
    val_split: str = typer.Option("val", "--val-split", help="Split on which the threshold is chosen."),
    test_split: str = typer.Option("test", "--test-split", help="Split on which the accuracy is reported."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the latent noise."),
    max_images: int = typer.Option(None, "--max-images", min=1, help="At most this many crops per split, evenly spaced."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per model call."),
    threads: int = typer.Option(0, "--threads", min=0, help="Torch CPU threads (0: torch's default)."),
) -> None:
    """Detect crops whose graders disagree on lesion presence from the samples (Appendix E, Table 1)."""
    from lidcseg.ambiguity import ambiguity_runs
    from lidcseg.reports.tables import fmt

    with stage_progress() as update:
        info = ambiguity_runs(data, run, out=out, val_split=val_split, test_split=test_split, n=n,
                              min_pixels=min_pixels, criterion=criterion, seed=seed, device=device,
                              batch_size=batch_size, max_images=max_images, threads=threads,
                              progress=update)
    for r in info["runs"]:
        console.print(f"{r['label']} ({r['model']}): ambiguous if < {r['threshold']} of {n} samples show "
                      f"a lesion; {test_split} accuracy {fmt(r['test']['accuracy'])}, balanced "
                      f"{fmt(r['test']['balanced_accuracy'])}")
    console.print(f"wrote {out}/ambiguity.md, ambiguity.json, per_crop.csv, histograms.png")


@one_line_errors
def latent(
    run: Path = typer.Option(..., "--run", help="A Probabilistic U-Net run directory or checkpoint folder."),
    data: Path = typer.Option(..., "--data", help="Folder with the split files."),
    index: int = typer.Option(..., "--index", min=0, help="Row of the crop in DATA/<split>.h5."),
    out: Path = typer.Option(..., "--out", help="The PNG to write (an existing PNG is replaced)."),
    split: str = typer.Option("test", "--split", help="Split of the crop."),
    dims: str = typer.Option("0,1", "--dims", help="The two latent dimensions of the plane (others at the prior mean)."),
    grid: int = typer.Option(19, "--grid", help="Grid points per axis, 2 to 101 (Fig. 6: 19)."),
    extent: float = typer.Option(3.0, "--extent", min=0.1, help="The grid spans ±extent prior standard deviations."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Decode a grid of a 2-D latent plane of one crop, with the graders' posterior means (Fig. 6)."""
    from lidcseg.latent import check_grid, latent_figure

    check_grid(grid, extent)
    with stage_progress() as update:
        update("decode grid", 0, 1)
        png, g = latent_figure(run, data, index, out, split=split, dims=dims, size=grid, extent=extent,
                               device=device)
        update("decode grid", 1, 1)
    inside = sum(float(abs(p).max()) <= extent for p in g.posterior_u)
    console.print(f"wrote {png} ({grid}×{grid} grid over ±{extent:g}σ of dims {g.dims[0]},{g.dims[1]}; "
                  f"{inside}/{len(g.posterior_u)} grader posterior means inside)")
