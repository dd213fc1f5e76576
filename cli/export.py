"""``lidcseg export``: a trained run in a format other tools run (a MONAI Bundle)."""

from __future__ import annotations

from pathlib import Path

import typer

from lidcseg_cli._common import console, one_line_errors


@one_line_errors
def export(
    run: Path = typer.Argument(..., help="A `lidcseg train` run folder (uses refit/, else best/, else last/)."),
    format: str = typer.Option("monai-bundle", "--format", help="Export format: monai-bundle."),
    out: Path = typer.Option(..., "--out", help="The bundle folder to write (written whole)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a folder written earlier by `lidcseg export` "
        "(any other non-empty folder is refused)."
    ),
) -> None:
    """Export a trained run: a MONAI Bundle (metadata, inference config, model.pt, model.ts, README)."""
    from lidcseg.export import export_run

    folder = export_run(run, out, format=format, overwrite=overwrite)
    console.print(f"wrote a {format} of {run} to {folder}")
