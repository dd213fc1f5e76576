"""``lidcseg``: the command-line entry point.

Torch is never imported at start-up: ``lidcseg prepare`` and ``--help`` stay fast.
"""

from __future__ import annotations

import typer

from lidcseg_cli import (
    _common,
    calibration,
    evaluate,
    export,
    import_cmd,
    phantom,
    prepare,
    reproduce,
    sample,
    train,
)

app = typer.Typer(
    name="lidcseg",
    cls=_common.SafeGroup,
    help="Ambiguous lung-lesion segmentation on LIDC-IDRI with the Probabilistic U-Net "
    "(Kohl et al., NeurIPS 2018).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from lidcseg import __version__

        typer.echo(f"lidcseg {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show the traceback of an internal error (also LIDCSEG_DEBUG=1)."
    ),
) -> None:
    """Ambiguous lung-lesion segmentation on LIDC-IDRI."""
    _common.debug_mode = debug


app.command("phantom")(phantom.phantom)
app.command("prepare")(prepare.prepare)
app.command("train", epilog=train.EPILOG)(train.train)
app.command("sample")(sample.sample)
app.command("evaluate")(evaluate.evaluate)
app.command("ambiguity")(evaluate.ambiguity)
app.command("latent")(evaluate.latent)
app.add_typer(import_cmd.app, name="import")
app.add_typer(calibration.cityscapes_app, name="cityscapes")
app.add_typer(calibration.scenes_app, name="scenes")
app.command("calibration")(calibration.calibration)
app.command("reproduce", epilog=reproduce.EPILOG)(reproduce.reproduce)
app.command("export")(export.export)

if __name__ == "__main__":  # pragma: no cover
    app()
