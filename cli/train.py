"""``lidcseg train``: fit a model on prepared crops, with resumable checkpoints."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import typer
from rich.markup import escape

from lidcseg.config import MODEL_SUMMARIES
from lidcseg.presets import PRESET_SUMMARIES, TASK_PRESET_NAMES
from lidcseg_cli._common import console, one_line_errors, progress_bar


def _listing(rows: dict[str, str]) -> str:
    """``name  summary`` lines, the summaries wrapped to fit 80 columns (78 inside the padding) with a hanging indent."""
    indent = 4 + max(map(len, rows))
    return "\n".join(
        escape(textwrap.fill(summary, 78, initial_indent=f"  {name:{indent - 4}s}  ",
                             subsequent_indent=" " * indent))
        for name, summary in rows.items()
    )


_ON_SCENES = " and ".join(f"{a} means {b}" for a, b in TASK_PRESET_NAMES["flip-scenes"].items())

#: Below the options of ``lidcseg train --help``: every model and preset, from lidcseg.config
#: (torch-free, so that ``--help`` stays fast).
EPILOG = (
    f"[b]Models[/b] (--model):\n{_listing(MODEL_SUMMARIES)}\n\n"
    f"[b]Presets[/b] (--preset):\n{_listing(PRESET_SUMMARIES)}\n"
    f"  On flip-task scenes {_ON_SCENES}."
)


@one_line_errors
def train(
    data: Path = typer.Option(..., "--data", help="Folder with train.h5 and val.h5 from `lidcseg prepare` (or `lidcseg scenes make`)."),
    out: Path = typer.Option(..., "--out", help="Run directory: config, metrics.jsonl, last/ and best/."),
    model: str = typer.Option(
        None, "--model", help="Model name, one of those listed below (default: the preset's, probunet)."
    ),
    preset: str = typer.Option(
        None, "--preset",
        help="Preset, one of those listed below. Default: paper, or the run's own config with --resume.",
    ),
    config: Path = typer.Option(
        None, "--config", help='JSON {"model": {...}, "train": {...}} applied over the preset.'
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="Override one field, e.g. --set lr=3e-4 --set model.beta=2 (repeatable)."
    ),
    steps: int = typer.Option(None, "--steps", min=1, help="Training iterations (overrides the preset)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default: the config's, auto)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last/ checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out (only a lidcseg run; any other folder is refused)."),
) -> None:
    """Train the Probabilistic U-Net (or a baseline) on LIDC crops.

    Under `torchrun --nproc_per_node N` the same command trains with
    DistributedDataParallel.

    The config is composed in this order, a later source winning: the
    preset, the model name's own defaults on the data's task (LIDC crops
    or flip scenes), --config, then --set, --steps and --device.
    """
    from lidcseg.data.scenes import TASK, is_scene_data
    from lidcseg.errors import LidcsegError
    from lidcseg.io.outputs import check_output_folder
    from lidcseg.models.registry import model_config
    from lidcseg.presets import base_preset, compose
    from lidcseg.training import TrainEvent, load_run_config
    from lidcseg.training import train as run
    from lidcseg.training.run_state import RUN_OUTPUT

    if resume and overwrite:
        raise LidcsegError("--resume and --overwrite exclude each other")
    check_output_folder(out, RUN_OUTPUT, inputs=[data, config], overwrite=overwrite)  # not over an input
    task = TASK if is_scene_data(data) else "lidc"
    model_cfg, train_cfg = compose(
        preset, model_defaults=model_config, task=task, model=model,
        config_file=config, overrides=set_ or [], steps=steps, device=device,
        saved=(lambda: load_run_config(out)) if resume else None,
    )

    best: dict[str, float] = {}
    rank0 = os.environ.get("RANK", "0") == "0"
    with progress_bar("train", "{task.fields[rate]}", "loss {task.fields[loss]}", total=train_cfg.steps,
                      remaining=True, start=False, disable=not rank0, rate="", loss="") as bar:

        def on_event(e: TrainEvent) -> None:
            if e.kind == "start":
                bar.start()
                bar.update(completed=e.step)
            elif e.kind == "step":
                bar.update(completed=e.step, rate=f"{e.metrics.get('it_s', 0.0):.2f} it/s",
                           loss=f"{e.metrics.get('loss', float('nan')):.4g}")
            elif e.kind == "val":
                if e.metrics["ged"] < best.get("ged", float("inf")):
                    best.update(ged=e.metrics["ged"], step=e.step)
                console.print(
                    f"step {e.step}: GED@{train_cfg.val_samples} {e.metrics['ged']:.4f}, "
                    f"sample diversity {e.metrics['diversity']:.4f}"
                )
            elif e.kind == "refit" and e.step == 1:
                console.print(f"refitting the prior net to the labels' mode frequencies ({e.steps} steps)")
            elif e.kind == "checkpoint" and e.path is not None and e.path.name == "refit":
                calib = (f", mode r {e.metrics['mode_r']:.3f}, mode MAE {e.metrics['mode_mae']:.4f}"
                         if "mode_r" in e.metrics else "")
                console.print(f"prior refit: GED@{train_cfg.val_samples} {e.metrics['ged']:.4f}{calib} "
                              f"(the prior of refit step {e.metrics['kept_step']:.0f}) into {e.path}")

        run(data, model_cfg, train_cfg, out, resume=resume, overwrite=overwrite, callback=on_event,
            preset=base_preset(preset, task, resuming=resume, config_file=config))
    if rank0:
        tail = f"; best GED@{train_cfg.val_samples} {best['ged']:.4f} at step {best['step']:.0f}" if best else ""
        console.print(f"trained {train_cfg.steps} steps into {out}{tail}")
