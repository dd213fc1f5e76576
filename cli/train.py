"""``lidcseg train``: fit a model on prepared crops, with resumable checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lidcseg_cli._common import console, one_line_errors


@one_line_errors
def train(
    data: Path = typer.Option(..., "--data", help="Folder with train.h5 and val.h5 from `lidcseg prepare` (or `lidcseg scenes make`)."),
    out: Path = typer.Option(..., "--out", help="Run directory: config, metrics.jsonl, last/ and best/."),
    model: str = typer.Option(None, "--model", help="Model name (default: the preset's, probunet)."),
    preset: str = typer.Option(
        None, "--preset",
        help="paper (the paper's setting) or cpu-quick (minutes on a CPU); on flip-task "
        "scenes these are cityscapes and scenes-quick. Default: paper, or the run's own "
        "config with --resume.",
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out."),
) -> None:
    """Train the Probabilistic U-Net (or a baseline) on LIDC crops.

    Under `torchrun --nproc_per_node N` the same command trains with DistributedDataParallel.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from lidcseg.config import apply_config_file, apply_overrides
    from lidcseg.config import preset as get_preset
    from lidcseg.errors import LidcsegError
    from lidcseg.models.registry import MODEL_NAMES, model_config
    from lidcseg.training import TrainEvent, load_run_config
    from lidcseg.training import train as run

    if resume and overwrite:
        raise LidcsegError("--resume and --overwrite exclude each other")
    if resume and preset is None and config is None:
        model_cfg, train_cfg = load_run_config(out)
    else:
        from lidcseg.data.scenes import TASK, is_scene_data

        model_cfg, train_cfg = get_preset(preset or "paper", task=TASK if is_scene_data(data) else "lidc")
    if model is not None:
        # The name's own options and defaults (i2i-vae: beta 10, N = 3), before --config and --set.
        model_cfg = model_config(model, model_cfg)
    if config is not None:
        model_cfg, train_cfg = apply_config_file(model_cfg, train_cfg, config)
    extra = list(set_ or [])
    if steps is not None:
        extra.append(f"train.steps={steps}")
    if device is not None:
        extra.append(f"train.device={device}")
    model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, extra)
    if model_cfg.name not in MODEL_NAMES:
        raise LidcsegError(f"unknown model {model_cfg.name!r}; valid names: {', '.join(MODEL_NAMES)}")

    best: dict[str, float] = {}
    # Started on the first event, so that input errors print no empty progress bar.
    progress = Progress(
        TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=os.environ.get("RANK", "0") != "0",
    )
    task = progress.add_task("train", total=train_cfg.steps, rate="", loss="", start=False)
    started: list[bool] = []

    def on_event(e: TrainEvent) -> None:
        if e.kind == "start":
            started.append(True)
            progress.start()
            progress.start_task(task)
            progress.update(task, completed=e.step)
        elif e.kind == "step":
            progress.update(task, completed=e.step, rate=f"{e.metrics.get('it_s', 0.0):.2f} it/s",
                            loss=f"{e.metrics.get('loss', float('nan')):.4g}")
        elif e.kind == "val":
            if e.metrics["ged"] < best.get("ged", float("inf")):
                best.update(ged=e.metrics["ged"], step=e.step)
            progress.console.print(
                f"step {e.step}: GED@{train_cfg.val_samples} {e.metrics['ged']:.4f}, "
                f"sample diversity {e.metrics['diversity']:.4f}"
            )

    try:
        run(data, model_cfg, train_cfg, out, resume=resume, overwrite=overwrite, callback=on_event)
    finally:
        if started:  # a never-started Progress still prints a newline when stopped
            progress.stop()
    if os.environ.get("RANK", "0") == "0":
        tail = f"; best GED@{train_cfg.val_samples} {best['ged']:.4f} at step {best['step']:.0f}" if best else ""
        console.print(f"trained {train_cfg.steps} steps into {out}{tail}")
