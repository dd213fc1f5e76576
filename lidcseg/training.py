"""Training: ``train(data_dir, model_cfg, train_cfg, out_dir) -> run dir``.

One function runs the whole optimisation of the paper's Section 4 / Appendix
H.1 on the crop files ``DATA/train.h5`` and ``DATA/val.h5``, single-process or
under ``torchrun`` (DistributedDataParallel, detected from ``WORLD_SIZE`` /
``RANK`` / ``LOCAL_RANK``). It never prints: progress goes to ``callback``.

The run directory::

    RUN/
      config.json      resolved model + train config, data folder, world size
      env.json         versions (python, torch, monai, numpy, lidcseg), device
      metrics.jsonl    one JSON object a line: {"split": "train", step, loss, rec, kl,
                       kl_per_dim, beta, lr, it_s, img_s, ...} every ``log_every`` steps,
                       {"split": "val", step, ged, diversity, ...} at each validation
      last/            model.safetensors + config.json (lidcseg.models.checkpoint), and the
                       training state: state.safetensors (optimizer moments, torch RNG
                       states) + state.json (step, optimizer scalars, NumPy/Python RNG,
                       data-order position, best GED). No pickle anywhere.
      best/            the checkpoint of the lowest validation GED@``val_samples``

``last/`` is replaced atomically (written to a temporary folder, then swapped
by two renames; a crash between them leaves ``.last.old/``, which resume
recovers). After ``kill -9``, ``train(..., resume=True)`` restores weights,
Adam state, schedule position, RNG states and the data-order position; on CPU
the result equals an uninterrupted run bit for bit.

Loss (Eq. 4): ``rec + beta * KL``, with the model's reductions (cross-entropy
summed over pixels, averaged over the batch; see :mod:`lidcseg.losses`). Two
optional counters of posterior collapse, both off in the ``paper`` preset:
``kl_free_bits`` (the KL term becomes ``max(KL, N * kl_free_bits)``) and a
linear beta warm-up (``beta_warmup_steps``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lidcseg.config import ModelConfig, TrainConfig, from_dict, to_dict
from lidcseg.device import resolve_device
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import write_bytes_atomic, write_json_atomic

#: Fields that may differ between a run and its resumption (they do not change the
#: optimisation on the same device): the step budget, devices and bookkeeping.
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {"steps", "device", "num_workers", "log_every", "val_every", "val_max_crops",
     "val_batch_size", "checkpoint_every", "compile", "channels_last", "bf16", "threads"}
)
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
STATE_FORMAT = "lidcseg-train-state"
STATE_VERSION = 1


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


# -- learning-rate schedule -----------------------------------------------------------------


def lr_schedule(cfg: TrainConfig) -> tuple[list[int], list[float]]:
    """The piecewise-constant schedule: ``(boundaries, values)``.

    ``n = lr_decay_steps`` step-downs at ``round(steps * i / (n + 1))``, i = 1..n,
    each by ``(lr_final / lr) ** (1 / n)``; ``values`` has n + 1 entries and
    ``values[i]`` applies to steps in ``[boundaries[i-1], boundaries[i])``.
    Paper: boundaries 40k, 80k, 120k, 160k, 200k of 240k; values 1e-4, 3.98e-5,
    1.58e-5, 6.31e-6, 2.51e-6, 1e-6.
    """
    n = cfg.lr_decay_steps
    if n == 0:
        return [], [cfg.lr]
    boundaries = [round(cfg.steps * i / (n + 1)) for i in range(1, n + 1)]
    values = [cfg.lr * (cfg.lr_final / cfg.lr) ** (i / n) for i in range(n + 1)]
    return boundaries, values


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    boundaries, values = lr_schedule(cfg)
    return values[sum(step >= b for b in boundaries)]


def beta_at(step: int, beta: float, cfg: TrainConfig) -> float:
    """KL weight of step ``step``: linear warm-up over ``beta_warmup_steps``, then ``beta``."""
    if cfg.beta_warmup_steps <= 0:
        return beta
    return beta * min(1.0, (step + 1) / cfg.beta_warmup_steps)


# -- the run -------------------------------------------------------------------------------


@dataclass
class _Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


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
        data_dir: folder of crop files from ``lidcseg prepare``.
        model_cfg: architecture (``create_model(model_cfg)``).
        train_cfg: optimisation and run settings.
        out_dir: the run directory (see the module docstring).
        resume: continue the run in ``out_dir`` from ``out_dir/last``. The configs must
            equal the saved ones except for :data:`RESUMABLE_CHANGES`.
        overwrite: replace an existing run directory.
        callback: receives :class:`TrainEvent` objects (rank 0 only).

    Returns:
        ``out_dir``.

    Raises:
        LidcsegError: missing data, an existing run without ``resume``/``overwrite``,
            nothing to resume, configs that do not match the run, or a non-finite
            loss (the last good checkpoint is kept).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if train_cfg.threads > 0:
        torch.set_num_threads(train_cfg.threads)
    dist = _init_distributed(train_cfg)
    try:
        return _train(data_dir, model_cfg, train_cfg, out_dir, resume, overwrite, callback, dist)
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()
        torch.set_num_threads(threads)  # process-wide settings go back as they were
        torch.use_deterministic_algorithms(deterministic)


def _train(
    data_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    resume: bool,
    overwrite: bool,
    callback: Callback | None,
    dist: _Dist,
) -> Path:
    from lidcseg.data.dataset import CropEvalDataset, CropTrainDataset, StreamSampler
    from lidcseg.data.scenes import (
        SceneEvalDataset,
        SceneTrainDataset,
        check_model_for_scenes,
        is_scene_data,
    )
    from lidcseg.data.transforms import AugmentParams
    from lidcseg.models.checkpoint import load_checkpoint
    from lidcseg.models.registry import create_model
    from lidcseg.seed import seed_everything

    def notify(event: TrainEvent) -> None:
        if callback is not None and dist.main:
            callback(event)

    device = _resolve_device(cfg.device, dist)
    train_path, val_path = _check_data(data_dir)
    last_dir = out_dir / "last"
    if resume:
        if dist.main:
            _recover_last(out_dir)
        dist.barrier()
        _check_resume(out_dir, model_cfg, cfg)
    else:
        _check_fresh(out_dir, overwrite)
    dist.barrier()  # every rank has looked before rank 0 changes anything

    # Data first: a bad file fails before any output is written.
    scenes = is_scene_data(data_dir)  # the flip task (Section 4.2): DATA/manifest.json says so
    if scenes:
        check_model_for_scenes(data_dir, model_cfg)
        train_ds: Any = SceneTrainDataset(train_path, seed=cfg.seed, augment=cfg.augment)
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
        start, best = _load_state(last_dir, optimizer, dist)
    if dist.main:
        if resume:
            _truncate_metrics(out_dir / "metrics.jsonl", start)
        elif overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "config.json", _run_config(data_dir, model_cfg, cfg, train_ds, dist))
        write_json_atomic(out_dir / "env.json", _environment(device, dist))
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
    val_batches: Any = val_ds.batches(cfg.val_batch_size) if scenes else _load_val(val_ds, cfg.val_batch_size)
    autocast = _autocast(device, cfg)
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
            out = forward(x, y, ignore)
        objective = _objective(out, beta, model_cfg, cfg)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        stats = _reduce_stats(objective, out, dist)  # the same numbers on every rank
        done = step + 1
        if not math.isfinite(stats["loss"]):
            where = f"last good checkpoint kept at {last_dir}" if (last_dir / "config.json").is_file() \
                else "no checkpoint was written yet"
            raise LidcsegError(f"non-finite loss at step {done}; {where}")
        optimizer.step()
        window.add(stats, lr, beta, x.shape[0] * dist.world)
        notify(TrainEvent("step", done, cfg.steps, {**_scalars(stats), "lr": lr, "it_s": window.it_s()}))

        if dist.main and (done % cfg.log_every == 0 or done == cfg.steps):
            _append_jsonl(metrics_path, {"split": "train", "step": done, **window.flush(),
                                         "time_s": round(time.perf_counter() - t_start, 3)})
        is_val = done == cfg.steps or (cfg.val_every > 0 and done % cfg.val_every == 0)
        if is_val:
            val = _validate(model, val_batches, cfg, device, autocast, scenes) if dist.main else {}
            if dist.main:
                _append_jsonl(metrics_path, {"split": "val", "step": done, **val})
                notify(TrainEvent("val", done, cfg.steps, val))
                if val["ged"] < best:
                    best = val["ged"]
                    with _atomic_dir(out_dir / "best") as d:
                        _save_model(d, model, done, val, cfg)
                    notify(TrainEvent("checkpoint", done, cfg.steps, val, out_dir / "best"))
            model.train()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            rng = _gather_rng(dist)
            if dist.main:
                with _atomic_dir(last_dir) as d:
                    _save_model(d, model, done, None, cfg)
                    _save_state(d, optimizer, done, best, cfg, rng, dist)
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


def _objective(
    out: Mapping[str, torch.Tensor], beta: float, model_cfg: ModelConfig, cfg: TrainConfig
) -> torch.Tensor:
    """The scalar to back-propagate.

    The paper's setting (no free bits, no warm-up) uses the model's own ``loss``
    untouched. Otherwise ``rec + beta_t * max(kl, N * kl_free_bits)``, built from
    the model's differentiable ``rec`` and ``kl`` (batch means, Eq. 4).
    """
    if (cfg.kl_free_bits == 0 and beta == model_cfg.beta) or "kl" not in out:
        return out["loss"]
    rec, kl = out.get("rec"), out.get("kl")
    if rec is None or kl is None or not (rec.requires_grad and kl.requires_grad):
        raise LidcsegError(
            f"model {model_cfg.name!r} reports no differentiable rec/kl terms; "
            "kl_free_bits and beta_warmup_steps need them"
        )
    floor = cfg.kl_free_bits * model_cfg.latent_dim
    return rec.float() + beta * torch.clamp(kl.float(), min=floor)


def _reduce_stats(
    objective: torch.Tensor, out: Mapping[str, torch.Tensor], dist: _Dist
) -> dict[str, Any]:
    """Loss terms as Python numbers, averaged over DDP ranks (one small all-reduce)."""
    parts = [objective.detach().float().reshape(1)]
    names = ["loss"]
    for k in ("loss", "rec", "kl"):
        if k in out:
            parts.append(out[k].detach().float().reshape(1))
            names.append("elbo" if k == "loss" else k)
    per_dim = out.get("kl_per_dim")
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


# -- validation ----------------------------------------------------------------------------


def _load_val(ds: Any, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (capped) validation split in memory: ``(images (b, 1, T, T), masks (b, G, T, T) bool)``."""
    batches = []
    for s in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(s, min(s + batch_size, len(ds)))]
        batches.append((torch.stack([it["image"] for it in items]),
                        torch.stack([it["masks"] for it in items]).bool()))
    return batches


@torch.no_grad()
def _validate(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device,
    autocast: contextlib.AbstractContextManager[Any],
    scenes: bool = False,
) -> dict[str, float]:
    """GED@``val_samples`` (Eq. 6, V-statistic, d = 1 - IoU) and sample diversity on val.

    On the flip task (``scenes``) the GED is Eq. 7 against the exact 32-mode mixture,
    with the calibration numbers beside it (:func:`lidcseg.calibration.validate_flip_task`).

    The latents come from a generator seeded with ``cfg.seed`` at every call, so
    two checkpoints are compared on the same noise, and the training RNG is untouched.

    Returns:
        ``ged``, ``diversity`` (E d(S, S')), ``graders`` (E d(Y, Y')), ``cross``
        (E d(S, Y)), ``pixels_varying`` (fraction of pixels whose label differs
        between samples), ``crops``, ``samples``, ``time_s``.
    """
    from lidcseg.metrics.ged import ged_terms

    t0 = time.perf_counter()
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    # Ensembles and M-Heads have a fixed number of members (``max_samples``).
    cap = getattr(model, "max_samples", None)
    n_samples = cfg.val_samples if cap is None else min(cfg.val_samples, cap)
    if scenes:
        from lidcseg.calibration import validate_flip_task

        return validate_flip_task(model, batches, n_samples, device=device, generator=gen,
                                  autocast=autocast, channels_last=cfg.channels_last)
    sums = dict.fromkeys(("ged", "diversity", "graders", "cross", "pixels_varying"), 0.0)
    n = 0
    for images, masks in batches:
        x = images.to(device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model.sample(x, n_samples, generator=gen)  # (b, n, C, T, T)
        samples = (logits.float().argmax(2) == 1).cpu()  # (b, n, T, T) foreground
        terms = ged_terms(samples, masks)
        varying = (samples.any(1) & ~samples.all(1)).flatten(1).float().mean(1)
        for k, v in (("ged", terms.ged), ("diversity", terms.samples), ("graders", terms.graders),
                     ("cross", terms.cross), ("pixels_varying", varying)):
            sums[k] += float(v.sum())
        n += x.shape[0]
    out = {k: v / n for k, v in sums.items()}
    out.update(crops=float(n), samples=float(n_samples), time_s=time.perf_counter() - t0)
    return out


# -- devices, DDP --------------------------------------------------------------------------


def _init_distributed(cfg: TrainConfig) -> _Dist:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    owns = False
    if not torch.distributed.is_initialized():
        use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(rank=rank, world=world, local_rank=local_rank, owns_group=owns)


def _resolve_device(name: str, dist: _Dist) -> torch.device:
    """:func:`lidcseg.device.resolve_device`; a CUDA device gets an index (0), and under
    DDP it is the rank's local GPU."""
    dev = resolve_device(name)
    if dev.type == "cpu":
        return dev
    if dist.world > 1:
        return torch.device("cuda", dist.local_rank)
    return dev if dev.index is not None else torch.device("cuda", 0)


def _autocast(device: torch.device, cfg: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- run directory -------------------------------------------------------------------------


def _check_data(data_dir: Path) -> tuple[Path, Path]:
    if not data_dir.is_dir():
        raise LidcsegError("data directory not found", data_dir)
    paths = data_dir / "train.h5", data_dir / "val.h5"
    for p in paths:
        if not p.is_file():
            raise LidcsegError(f"missing split file {p.name} (run `lidcseg prepare` first)", p)
    return paths


def _check_fresh(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise LidcsegError("run directory path exists and is not a folder", out_dir)
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise LidcsegError("run directory exists; pass --resume to continue it or --overwrite", out_dir)
    if not ((out_dir / "config.json").is_file() or (out_dir / "metrics.jsonl").is_file()):
        raise LidcsegError("refusing to overwrite a folder that is not a lidcseg run", out_dir)


def _recover_last(out_dir: Path) -> None:
    """Finish an interrupted ``last/`` swap (see :func:`_atomic_dir`)."""
    last, old = out_dir / "last", out_dir / ".last.old"
    if not last.is_dir() and old.is_dir():
        with contextlib.suppress(OSError):
            os.rename(old, last)


def _check_resume(out_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    last = out_dir / "last"
    if not (last / STATE_JSON).is_file():
        raise LidcsegError("nothing to resume: no last/ checkpoint with training state", out_dir)
    try:
        saved = json.loads((out_dir / "config.json").read_text())
        saved_model = from_dict(ModelConfig, saved["model"])
        saved_train = from_dict(TrainConfig, saved["train"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        raise LidcsegError("cannot read the run's config.json", out_dir / "config.json") from None
    diffs = [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)
             if getattr(saved_model, f.name) != getattr(model_cfg, f.name)]
    diffs += [f"train.{f.name}" for f in dataclasses.fields(TrainConfig)
              if f.name not in RESUMABLE_CHANGES
              and getattr(saved_train, f.name) != getattr(cfg, f.name)]
    if diffs:
        raise LidcsegError(f"cannot resume with a different {', '.join(diffs)} than the run", out_dir)


def load_run_config(out_dir: str | Path) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs saved in a run directory's ``config.json``."""
    path = Path(out_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
        return from_dict(ModelConfig, saved["model"]), from_dict(TrainConfig, saved["train"])
    except FileNotFoundError:
        raise LidcsegError("not a run directory (no config.json)", Path(out_dir)) from None
    except (KeyError, TypeError, json.JSONDecodeError):
        raise LidcsegError("cannot read the run's config", path) from None


def _run_config(
    data_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig, train_ds: Any, dist: _Dist
) -> dict[str, Any]:
    return {
        "model": to_dict(model_cfg),
        "train": to_dict(cfg),
        "data": {"dir": str(data_dir.resolve()), **(
            train_ds.describe() if hasattr(train_ds, "describe") else
            {"train_crops": len(train_ds), "crop_size": train_ds.store.crop_size,
             "n_graders": train_ds.n_graders})},
        "world_size": dist.world,
        "lr_schedule": dict(zip(("boundaries", "values"), lr_schedule(cfg), strict=True)),
    }


def _environment(device: torch.device, dist: _Dist) -> dict[str, Any]:
    import h5py
    import monai

    from lidcseg import __version__

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "lidcseg": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "world_size": dist.world,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row, allow_nan=True) + "\n")
        f.flush()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines written after the checkpoint being resumed (and a torn last line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            keep.append(line)
    write_bytes_atomic(path, "".join(line + "\n" for line in keep).encode())


# -- checkpoints and training state --------------------------------------------------------


@contextlib.contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield ``.NAME.tmp`` to fill; on success swap it in for ``NAME`` by two renames.

    A crash before the swap leaves ``NAME`` untouched; between the two renames it
    leaves ``.NAME.old``, which :func:`_recover_last` moves back.
    """
    tmp = final.parent / f".{final.name}.tmp"
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _save_model(
    folder: Path, model: nn.Module, step: int, val: Mapping[str, float] | None, cfg: TrainConfig
) -> None:
    from lidcseg.models.checkpoint import save_checkpoint

    meta: dict[str, Any] = {"step": step, "train": to_dict(cfg)}
    if val is not None:
        meta["val"] = dict(val)
    save_checkpoint(folder, model, meta=meta)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states: torch tensors and JSON-able NumPy/Python states."""
    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "tensors": tensors,
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss,
                  "cached_gaussian": cached},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }


def _gather_rng(dist: _Dist) -> list[dict[str, Any]]:
    """Every rank's RNG state, on rank 0 (other ranks get an empty list)."""
    state = _rng_state()
    if dist.world == 1:
        return [state]
    gathered: list[Any] = [None] * dist.world
    # In-memory exchange between processes; nothing pickled reaches the disk.
    torch.distributed.all_gather_object(gathered, state)
    return gathered if dist.main else []


def _save_state(
    folder: Path,
    optimizer: torch.optim.Optimizer,
    step: int,
    best: float,
    cfg: TrainConfig,
    rng: list[dict[str, Any]],
    dist: _Dist,
) -> None:
    """``state.safetensors`` (optimizer tensors, torch RNG) + ``state.json`` (the rest)."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    for r, state in enumerate(rng):
        for k, v in state["tensors"].items():
            tensors[f"rank{r}/{k}"] = v.cpu().contiguous()
    save_file(tensors, str(folder / STATE_TENSORS), metadata={"format": STATE_FORMAT})
    write_json_atomic(folder / STATE_JSON, {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": step,
        "best_val_ged": None if math.isinf(best) else best,
        "data_order": {"seed": cfg.seed, "batch_size": cfg.batch_size,
                       "samples_consumed": step * cfg.batch_size},
        "world_size": dist.world,
        "optimizer": {"param_groups": sd["param_groups"], "state_scalars": scalars},
        "rng": [{"numpy": s["numpy"], "python": s["python"]} for s in rng],
    })


def _load_state(folder: Path, optimizer: torch.optim.Optimizer, dist: _Dist) -> tuple[int, float]:
    """Restore optimizer and RNG states from ``folder``; returns ``(step, best val GED)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise LidcsegError(f"cannot read the training state ({e.__class__.__name__})", folder) from None
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise LidcsegError("not a lidcseg training state of a known version", folder / STATE_JSON)

    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["optimizer"]["state_scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = meta["optimizer"]["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise LidcsegError(f"optimizer state does not fit the model ({e})", folder) from None

    r = dist.rank if f"rank{dist.rank}/rng/torch_cpu" in tensors else 0
    torch.set_rng_state(tensors[f"rank{r}/rng/torch_cpu"])
    cuda_states = sorted(k for k in tensors if k.startswith(f"rank{r}/rng/cuda/"))
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda_states][: torch.cuda.device_count()])
    rng_json = meta["rng"][r] if r < len(meta["rng"]) else meta["rng"][0]
    npst = rng_json["numpy"]
    np.random.set_state((npst["kind"], np.asarray(npst["keys"], dtype=np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    py = rng_json["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    best = meta.get("best_val_ged")
    return int(meta["step"]), math.inf if best is None else float(best)


def iter_metrics(run_dir: str | Path, split: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a run's ``metrics.jsonl``, optionally only one ``split`` (``train``/``val``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LidcsegError("no metrics.jsonl", Path(run_dir))
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if split is None or row.get("split") == split:
                yield row
