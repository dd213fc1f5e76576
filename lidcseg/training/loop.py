"""The training loop: ``train(data_dir, model_cfg, train_cfg, out_dir) -> run dir``.

One optimizer step: the model's loss terms on a batch (``model.loss``, under
autocast), the objective of the step (:func:`lidcseg.training.schedule.objective`:
the trainer owns beta), backward, Adam. Every ``log_every`` steps the means of
the numbers go to ``metrics.jsonl``; validation, ``best/`` and ``last/`` follow
their own cadences (:mod:`lidcseg.training.run_state`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lidcseg.config import ModelConfig, TrainConfig
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import NoSpaceError, atomic_dir, recover_dir, write_json_atomic
from lidcseg.io.outputs import claim_output
from lidcseg.training.distributed import Dist, autocast_for, init_distributed, run_device
from lidcseg.training.run_state import (
    RUN_OUTPUT,
    STATE_JSON,
    append_jsonl,
    check_data,
    check_fresh,
    check_resume,
    environment,
    gather_rng,
    load_state,
    run_config,
    save_model,
    save_state,
    truncate_metrics,
)
from lidcseg.training.schedule import beta_at, elbo, lr_at, objective
from lidcseg.training.validation import load_val, validate


@dataclass(frozen=True)
class TrainEvent:
    """What :func:`train` reports to its callback (only on DDP rank 0).

    Attributes:
        kind: ``start`` (``step`` = first step to run), ``step`` (one optimizer step
            done), ``val`` (validation done), ``checkpoint`` (``path`` written),
            ``done`` (``path`` = run directory).
        step: optimizer steps completed.
        steps: total steps of the run.
        metrics: numbers of this event (``loss``, ``rec``, ``kl``, ``lr``, ``it_s``
            for ``step``; ``ged``, ``diversity`` for ``val``).
        path: the file or folder concerned, if any.
    """

    kind: str
    step: int
    steps: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    path: Path | None = None


Callback = Callable[[TrainEvent], None]


def train(
    data_dir: str | Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callback | None = None,
) -> Path:
    """Train a model on ``data_dir/train.h5``, validating on ``data_dir/val.h5``.

    Args:
        data_dir: folder of crop files from ``lidcseg prepare`` (or of flip-task scenes).
        model_cfg: architecture (``create_model(model_cfg)``) and ``beta``.
        train_cfg: optimisation and run settings.
        out_dir: the run directory (see :mod:`lidcseg.training`).
        resume: continue the run in ``out_dir`` from ``out_dir/last``. The configs must
            equal the saved ones except for :data:`~lidcseg.training.run_state.RESUMABLE_CHANGES`.
        overwrite: replace an existing run directory.
        callback: receives :class:`TrainEvent` objects (rank 0 only).

    Returns:
        ``out_dir``.

    Raises:
        LidcsegError: missing data, an existing run without ``resume``/``overwrite``,
            nothing to resume, configs that do not match the run, or a non-finite
            loss (the last good checkpoint is kept).
        NoSpaceError: the disk filled up (naming the file). ``last/`` keeps the previous
            checkpoint (it is replaced only once the new one is complete) and
            ``metrics.jsonl`` has no torn line, so ``resume`` continues once space is freed.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if train_cfg.threads > 0:
        torch.set_num_threads(train_cfg.threads)
    dist = init_distributed(train_cfg)
    try:
        return _train(data_dir, model_cfg, train_cfg, out_dir, resume, overwrite, callback, dist)
    except NoSpaceError as e:
        raise e.with_hint(_no_space_hint(out_dir)) from None
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()
        torch.set_num_threads(threads)  # process-wide settings go back as they were
        torch.use_deterministic_algorithms(deterministic)


def _no_space_hint(out_dir: Path) -> str:
    """What to do after a full disk stopped a run: resume from ``last/`` if there is one."""
    try:
        step = int(json.loads((out_dir / "last" / STATE_JSON).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "no checkpoint was written yet: free some space and start the run again"
    return f"last/ keeps step {step}: free some space and continue with --resume"


def _datasets(
    data_dir: Path, train_path: Path, val_path: Path, model_cfg: ModelConfig, cfg: TrainConfig
) -> tuple[Any, Any, bool]:
    """``(train dataset, val dataset, scenes)``: LIDC crops, or the flip task's scenes."""
    from lidcseg.data.dataset import CropEvalDataset, CropTrainDataset
    from lidcseg.data.scenes import (
        SceneEvalDataset,
        SceneTrainDataset,
        check_model_for_scenes,
        is_scene_data,
    )
    from lidcseg.data.transforms import AugmentParams

    scenes = is_scene_data(data_dir)  # the flip task (Section 4.2): DATA/manifest.json says so
    if scenes:
        check_model_for_scenes(data_dir, model_cfg)
        train_ds: Any = SceneTrainDataset(train_path, seed=cfg.seed, augment=cfg.augment,
                                          scheme=cfg.scene_augment)
        val_ds: Any = SceneEvalDataset(val_path, limit=cfg.val_max_crops)
    else:
        train_ds = CropTrainDataset(
            train_path,
            input_size=cfg.input_size,
            seed=cfg.seed,
            augment=cfg.augment,
            grader_draw=cfg.grader_draw,
            augment_params=AugmentParams(
                rotate_deg=cfg.aug_rotate_deg, shear=cfg.aug_shear, scale=cfg.aug_scale,
                elastic_spacing=cfg.aug_elastic_spacing,
                elastic_magnitude=cfg.aug_elastic_magnitude, max_shift=cfg.aug_max_shift,
            ),
        )
        val_ds = CropEvalDataset(val_path, input_size=cfg.input_size, limit=cfg.val_max_crops)
    if len(val_ds) == 0:
        raise LidcsegError("split has no crops", val_path)
    return train_ds, val_ds, scenes


def _train(
    data_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    resume: bool,
    overwrite: bool,
    callback: Callback | None,
    dist: Dist,
) -> Path:
    from lidcseg.data.dataset import StreamSampler
    from lidcseg.models.checkpoint import load_checkpoint
    from lidcseg.models.registry import create_model
    from lidcseg.seed import seed_everything

    def notify(event: TrainEvent) -> None:
        if callback is not None and dist.main:
            callback(event)

    device = run_device(cfg.device, dist)
    train_path, val_path = check_data(data_dir)
    last_dir = out_dir / "last"
    if resume:
        if dist.main:
            recover_dir(last_dir)
        dist.barrier()
        check_resume(out_dir, model_cfg, cfg)
    else:
        check_fresh(out_dir, overwrite, inputs=(data_dir,))
    dist.barrier()  # every rank has looked before rank 0 changes anything

    # Data first: a bad file fails before any output is written.
    train_ds, val_ds, scenes = _datasets(data_dir, train_path, val_path, model_cfg, cfg)

    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed)
    model = create_model(model_cfg)  # identical initial weights on every rank
    if dist.world > 1:
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)  # distinct posterior noise per rank
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    start, best = 0, math.inf
    if resume:
        ckpt = load_checkpoint(last_dir, device="cpu", expected_name=model_cfg.name)
        model.load_state_dict(ckpt.model.state_dict())
        start, best = load_state(last_dir, optimizer, dist)
    if dist.main:
        if resume:
            truncate_metrics(out_dir / "metrics.jsonl", start)
        elif overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
            shutil.rmtree(out_dir)
        claim_output(out_dir, RUN_OUTPUT)
        write_json_atomic(out_dir / "config.json", run_config(data_dir, model_cfg, cfg, train_ds, dist))
        write_json_atomic(out_dir / "env.json", environment(device, dist))
    dist.barrier()

    forward: nn.Module = _LossForward(model)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        forward = torch.compile(forward)  # type: ignore[assignment]

    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=cfg.batch_size // dist.world,
        sampler=StreamSampler(cfg.batch_size, start, cfg.steps, dist.rank, dist.world),
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        # The loader's own seed draw must not consume the global RNG, which is part of
        # the restored state (samples carry their own augmentation seeds).
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    val_batches: Any = val_ds.batches(cfg.val_batch_size) if scenes else load_val(val_ds, cfg.val_batch_size)
    autocast = autocast_for(device, cfg)
    metrics_path = out_dir / "metrics.jsonl"
    window = _Window()
    notify(TrainEvent("start", start, cfg.steps, {"resumed": float(resume)}))
    t_start = time.perf_counter()

    model.train()
    for step, batch in zip(range(start, cfg.steps), loader, strict=False):
        lr, beta = lr_at(step, cfg), beta_at(step, model_cfg.beta, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = batch["image"].to(device, non_blocking=True)
        y = batch["mask"].to(device, non_blocking=True)
        ignore = batch["ignore"].to(device, non_blocking=True) if "ignore" in batch else None
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            terms = forward(x, y, ignore)
        loss = objective(terms, beta, model_cfg, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats = _reduce_stats(loss, terms, model_cfg.beta, dist)  # the same numbers on every rank
        done = step + 1
        if not math.isfinite(stats["loss"]):
            where = f"last good checkpoint kept at {last_dir}" if (last_dir / "config.json").is_file() \
                else "no checkpoint was written yet"
            raise LidcsegError(f"non-finite loss at step {done}; {where}")
        optimizer.step()
        window.add(stats, lr, beta, x.shape[0] * dist.world)
        notify(TrainEvent("step", done, cfg.steps, {**_scalars(stats), "lr": lr, "it_s": window.it_s()}))

        if dist.main and (done % cfg.log_every == 0 or done == cfg.steps):
            append_jsonl(metrics_path, {"split": "train", "step": done, **window.flush(),
                                        "time_s": round(time.perf_counter() - t_start, 3)})
        is_val = done == cfg.steps or (cfg.val_every > 0 and done % cfg.val_every == 0)
        if is_val:
            val = validate(model, val_batches, cfg, device, autocast, scenes) if dist.main else {}
            if dist.main:
                append_jsonl(metrics_path, {"split": "val", "step": done, **val})
                notify(TrainEvent("val", done, cfg.steps, val))
                if val["ged"] < best:
                    best = val["ged"]
                    with atomic_dir(out_dir / "best") as d:
                        save_model(d, model, done, val, cfg)
                    notify(TrainEvent("checkpoint", done, cfg.steps, val, out_dir / "best"))
            model.train()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            rng = gather_rng(dist)
            if dist.main:
                with atomic_dir(last_dir) as d:
                    save_model(d, model, done, None, cfg)
                    save_state(d, optimizer, done, best, cfg, rng, dist)
                notify(TrainEvent("checkpoint", done, cfg.steps, {}, last_dir))
            dist.barrier()
    notify(TrainEvent("done", cfg.steps, cfg.steps, {}, out_dir))
    return out_dir


class _LossForward(nn.Module):
    """Routes ``forward`` to ``model.loss`` so DDP (which hooks ``forward``) syncs gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, ignore: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return self.model.loss(x, y, ignore)


def _reduce_stats(
    loss: torch.Tensor, terms: Mapping[str, torch.Tensor], beta: float, dist: Dist
) -> dict[str, Any]:
    """The step's numbers as Python floats, averaged over DDP ranks (one small all-reduce).

    ``loss`` (the objective), ``elbo`` (``rec + beta * kl`` at the model's own beta),
    ``rec``, ``kl`` (latent models) and the list ``kl_per_dim`` (N,).
    """
    parts = [loss.detach().float().reshape(1)]
    names = ["loss"]
    with torch.no_grad():
        parts.append(elbo(terms, beta).detach().float().reshape(1))
    names.append("elbo")
    for k in ("rec", "kl"):
        if k in terms:
            parts.append(terms[k].detach().float().reshape(1))
            names.append(k)
    per_dim = terms.get("kl_per_dim")
    if per_dim is not None:
        parts.append(per_dim.detach().float().reshape(-1))
    vec = torch.cat(parts)
    if dist.world > 1:
        torch.distributed.all_reduce(vec)
        vec /= dist.world
    values = vec.cpu().tolist()
    stats: dict[str, Any] = dict(zip(names, values[: len(names)], strict=True))
    if per_dim is not None:
        stats["kl_per_dim"] = values[len(names) :]
    return stats


def _scalars(stats: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in stats.items() if isinstance(v, float)}


class _Window:
    """Means of the training numbers since the last ``metrics.jsonl`` line."""

    def __init__(self) -> None:
        self.ema: float | None = None  # smoothed it/s, kept across windows
        self.t_step = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Any] = {}
        self.n = 0
        self.images = 0
        self.t0 = time.perf_counter()
        self.last: tuple[float, float] = (0.0, 0.0)

    def add(self, stats: Mapping[str, Any], lr: float, beta: float, images: int) -> None:
        for k, v in stats.items():
            if isinstance(v, list):
                prev = self.sums.get(k, [0.0] * len(v))
                self.sums[k] = [a + b for a, b in zip(prev, v, strict=True)]
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        self.images += images
        self.last = (lr, beta)
        now = time.perf_counter()
        rate = 1.0 / max(now - self.t_step, 1e-9)
        self.ema = rate if self.ema is None else 0.8 * self.ema + 0.2 * rate
        self.t_step = now

    def it_s(self) -> float:
        return float(self.ema or 0.0)

    def flush(self) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        row: dict[str, Any] = {}
        for k, v in self.sums.items():
            row[k] = [a / self.n for a in v] if isinstance(v, list) else v / self.n
        row.update(lr=self.last[0], beta=self.last[1], it_s=self.n / elapsed,
                   img_s=self.images / elapsed, steps_in_mean=self.n)
        self.reset()
        return row
