"""``lidcseg import``: convert the public preprocessed LIDC releases into our crop format.

So that results can be compared with published numbers on the same data (LIDCv1 for the
Prob. U-Net / PHiSeg / SSN line, LIDCv2 for the HPU-Net). See :mod:`lidcseg.data.releases`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lidcseg_cli._common import one_line_errors, report_cleanup, stage_progress

if TYPE_CHECKING:
    from lidcseg.data.releases import ImportSummary

app = typer.Typer(
    help="Convert a public preprocessed LIDC release (LIDCv1 pickle, LIDCv2 PNG crops) into "
    "DATA/{train,val,test}.h5 + manifest.json.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_OUT = typer.Option(..., "--out", "-o", help="Data folder to write (train/val/test.h5, manifest.json).")
_OVERWRITE = typer.Option(
    False, "--overwrite", help="Replace a data set that `lidcseg import` wrote in --out (any other folder is refused)."
)


def _report(summary: ImportSummary) -> None:
    """Print one line per split written, then where the manifest is."""
    from lidcseg.data.releases import SPLITS

    m = summary.manifest
    report_cleanup(m)
    for split in SPLITS:
        if split in m["splits"]:
            s = m["splits"][split]
            typer.echo(f"{split:5s} {s['crops']:6d} crops  {s['patients']:4d} patients  {summary.out / s['file']}")
    typer.echo(f"intensity {m['intensity']} (image / {m['intensity_scale']:g} is the release's [0, 1] image)")
    typer.echo(f"wrote {summary.out / 'manifest.json'}")


@app.command("pytorch-pickle")
@one_line_errors
def pytorch_pickle(
    file: Path = typer.Argument(..., help="The PyTorch port's data_lidc.pickle (LIDCv1, 128x128)."),
    out: Path = _OUT,
    seed: int = typer.Option(0, "--seed", help="Seed of the patient split (722/144/144 proportions)."),
    overwrite: bool = _OVERWRITE,
) -> None:
    """Import the LIDCv1 pickle, split by patient with a seeded split.

    The pickle is read without running its code: only numpy arrays in plain containers load.
    """
    from lidcseg.data.releases import import_pytorch_pickle
    from lidcseg.data.releases.common import check_out

    check_out(out, overwrite, [file])  # before reading the pickle
    with stage_progress() as progress:
        summary = import_pytorch_pickle(file, out, seed=seed, overwrite=overwrite, progress=progress)
    _report(summary)


@app.command("hpunet-png")
@one_line_errors
def hpunet_png(
    folder: Path = typer.Argument(
        ..., help="Folder with the unpacked HPU-Net LIDC crops (LIDCv2, 180x180): "
        "<split>/images/<patient>/*.png and <split>/gt/<patient>/*_l<grader>.png."
    ),
    out: Path = _OUT,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Import the LIDCv2 PNG crops, keeping the release's own train/val/test split."""
    from lidcseg.data.releases import import_hpunet_png
    from lidcseg.data.releases.common import check_out

    check_out(out, overwrite, [folder])  # before reading the PNGs
    with stage_progress() as progress:
        summary = import_hpunet_png(folder, out, overwrite=overwrite, progress=progress)
    _report(summary)
