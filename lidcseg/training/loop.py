"""The training loop: ``train(data_dir, model_cfg, train_cfg, out_dir) -> run dir``.

One optimizer step: the model's loss terms on a batch (``model.loss``, under
autocast), the objective of the step (:func:`lidcseg.training.schedule.objective`:
the trainer owns beta), backward, Adam. Every ``log_every`` steps the means of
the numbers go to ``metrics.jsonl``; validation, ``best/`` and ``last/`` follow
their own cadences (:mod:`lidcseg.training.run_state`).

On CUDA the step's numbers stay on the device until the next sync point (a log
step, validation, a checkpoint, the end; :mod:`lidcseg.training.stats`), so the
host queues steps ahead of the GPU; a batch crosses to the device in one place,
:func:`batch_to_device`. Adam is fused on CUDA and cuDNN picks its fastest
convolutions (``cudnn.benchmark``) unless ``deterministic``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lidcseg.config import ModelConfig, TrainConfig
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import NoSpaceError, atomic_dir, recover_dir, write_json_atomic
from lidcseg.io.outputs import claim_output
from lidcseg.training.distributed import Dist, autocast_for, init_distributed, run_device
from lidcseg.training.prior_refit import (
    REFIT_DIR,
    candidate_batches,
    has_prior_net,
    refit_criterion,
    run_prior_refit,
)
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
    recorded_preset,
    run_config,
    save_model,
    save_state,
    truncate_metrics,
)
from lidcseg.training.schedule import beta_at, lr_at, noise_scale_at, objective
from lidcseg.training.stats import MAX_UNCHECKED_STEPS, StatsWindow, defer_sync, step_vector
from lidcseg.training.validation import load_val, validate

if TYPE_CHECKING:
    from lidcseg.data.device_augment import DeviceAugment


@dataclass(frozen=True)
class TrainEvent:
    """What :func:`train` reports to its callback (only on DDP rank 0).

    Attributes:
        kind: ``start`` (``step`` = first step to run), ``step`` (one optimizer step
            done), ``val`` (validation done), ``checkpoint`` (``path`` written),
            ``refit`` (one step of the prior refit after training done,
            :mod:`lidcseg.training.prior_refit`), ``done`` (``path`` = run directory).
        step: optimizer steps completed (of the refit, for ``refit`` and its ``checkpoint``).
        steps: total steps of the run (of the refit, for those).
        metrics: numbers of this event (``loss``, ``elbo``, ``rec``, ``kl``, ``lr``, ``it_s``
            for ``step``; ``ged``, ``diversity`` for ``val``). On CUDA a ``step`` event
            carries the loss terms of the last step read back at a sync point (none
            before the first; :mod:`lidcseg.training.stats`), on the CPU its own.
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
    preset: str | None = None,
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
        preset: the named preset the configs were composed from (``config.json``'s
            ``preset``, for provenance); None keeps what a resumed run recorded.

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
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if train_cfg.threads > 0:
        torch.set_num_threads(train_cfg.threads)
    dist = init_distributed(train_cfg)
    try:
        return _train(data_dir, model_cfg, train_cfg, out_dir, resume, overwrite, callback, dist, preset)
    except NoSpaceError as e:
        raise e.with_hint(_no_space_hint(out_dir)) from None
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()
        torch.set_num_threads(threads)  # process-wide settings go back as they were
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = cudnn_benchmark


def _no_space_hint(out_dir: Path) -> str:
    """What to do after a full disk stopped a run: resume from ``last/`` if there is one."""
    try:
        step = int(json.loads((out_dir / "last" / STATE_JSON).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "no checkpoint was written yet: free some space and start the run again"
    return f"last/ keeps step {step}: free some space and continue with --resume"


def training_datasets(
    data_dir: Path, train_path: Path, val_path: Path, model_cfg: ModelConfig, cfg: TrainConfig
) -> tuple[Any, Any, bool]:
    """``(train dataset, val dataset, scenes)``: LIDC crops, or the flip task's scenes.

    ``train_path``, ``val_path``: from :func:`~lidcseg.training.run_state.check_data`.

    Raises:
        LidcsegError: a bad split file, an empty validation split, or a model unfit for scenes.
    """
    from lidcseg.data.dataset import CropTrainDataset
    from lidcseg.data.scenes import SceneTrainDataset, check_model_for_scenes, is_scene_data
    from lidcseg.data.transforms import AugmentParams

    scenes = is_scene_data(data_dir)  # the flip task (Section 4.2): DATA/manifest.json says so
    if scenes:
        check_model_for_scenes(data_dir, model_cfg)
        train_ds: Any = SceneTrainDataset(train_path, seed=cfg.seed, augment=cfg.augment,
                                          scheme=cfg.scene_augment)
    else:
        train_ds = CropTrainDataset(
            train_path,
            input_size=cfg.input_size,
            seed=cfg.seed,
            augment=cfg.augment,
            grader_draw=cfg.grader_draw,
            augment_on=cfg.augment_on,
            augment_params=AugmentParams(
                rotate_deg=cfg.aug_rotate_deg, shear=cfg.aug_shear, scale=cfg.aug_scale,
                elastic_spacing=cfg.aug_elastic_spacing,
                elastic_magnitude=cfg.aug_elastic_magnitude, max_shift=cfg.aug_max_shift,
            ),
        )
    val_ds = eval_split(val_path, cfg, scenes, limit=cfg.val_max_crops)
    if len(val_ds) == 0:
        raise LidcsegError("split has no crops", val_path)
    return train_ds, val_ds, scenes


def eval_split(path: Path, cfg: TrainConfig, scenes: bool, limit: int | None = None) -> Any:
    """A split as an evaluation dataset (no augmentation; all of an image's labels): scenes with
    their un-flipped labels, or LIDC centre tiles with every grader's mask; at most ``limit``."""
    from lidcseg.data.dataset import CropEvalDataset
    from lidcseg.data.scenes import SceneEvalDataset

    if scenes:
        return SceneEvalDataset(path, limit=limit)
    return CropEvalDataset(path, input_size=cfg.input_size, limit=limit)


def _train(
    data_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    resume: bool,
    overwrite: bool,
    callback: Callback | None,
    dist: Dist,
    preset: str | None = None,
) -> Path:
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
    train_ds, val_ds, scenes = training_datasets(data_dir, train_path, val_path, model_cfg, cfg)

    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":  # fixed shapes: let cuDNN time its algorithms once (not reproducible)
        torch.backends.cudnn.benchmark = not cfg.deterministic
    seed_everything(cfg.seed)
    model = create_model(model_cfg)  # identical initial weights on every rank
    if dist.world > 1:
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)  # distinct posterior noise per rank
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # Fused Adam: one kernel for all parameters on CUDA; the CPU keeps the reference loop.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=True if device.type == "cuda" else None)

    start, best = 0, math.inf
    if resume:
        ckpt = load_checkpoint(last_dir, device="cpu", expected_name=model_cfg.name)
        model.load_state_dict(ckpt.model.state_dict())
        start, best = load_state(last_dir, optimizer, dist)
    if dist.main:
        if resume:
            truncate_metrics(out_dir / "metrics.jsonl", start)
            preset = preset or recorded_preset(out_dir)
            if start < cfg.steps and (out_dir / REFIT_DIR).is_dir():
                shutil.rmtree(out_dir / REFIT_DIR)  # this run's refit of weights about to change
        elif overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
            shutil.rmtree(out_dir)
        claim_output(out_dir, RUN_OUTPUT)
        write_json_atomic(out_dir / "config.json", run_config(data_dir, model_cfg, cfg, train_ds, dist,
                                                                preset))
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

    loader = training_loader(train_ds, cfg, device, dist, start)
    device_aug = device_augment_for(train_ds)
    val_batches: Any = val_ds.batches(cfg.val_batch_size) if scenes else load_val(val_ds, cfg.val_batch_size)
    autocast = autocast_for(device, cfg)
    metrics_path = out_dir / "metrics.jsonl"
    window = StatsWindow(min(cfg.log_every, MAX_UNCHECKED_STEPS) if defer_sync(device) else 1)
    notify(TrainEvent("start", start, cfg.steps, {"resumed": float(resume)}))
    t_start = time.perf_counter()

    model.train()
    # a_t of the posterior noise warm-up (None: without one, or a model without a posterior net)
    noise_scale = torch.zeros((), device=device) if model.scales_posterior_noise else None
    for step, batch in zip(range(start, cfg.steps), loader, strict=False):
        lr, beta = lr_at(step, cfg), beta_at(step, model_cfg.beta, cfg)
        noise = noise_scale_at(step, cfg) if noise_scale is not None else None
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, ignore = batch_to_device(batch, device, cfg.channels_last, device_aug)
        with autocast:
            # The noise scale as a device tensor, filled in place: torch.compile would specialise
            # on every value of a float, and a new CUDA tensor from the host may wait for the GPU.
            terms = forward(x, y, ignore) if noise is None or noise_scale is None else \
                forward(x, y, ignore, noise_scale.fill_(noise))
        loss = objective(terms, beta, model_cfg, cfg)  # outside autocast: float32 arithmetic
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        done = step + 1
        # The same numbers on every rank; on CUDA they stay on the device until a sync point.
        window.record(done, *step_vector(loss, terms, model_cfg.beta, dist))
        is_log = done % cfg.log_every == 0 or done == cfg.steps
        is_val = done == cfg.steps or (cfg.val_every > 0 and done % cfg.val_every == 0)
        is_checkpoint = done % cfg.checkpoint_every == 0 or done == cfg.steps
        if window.due(done) or is_log or is_val or is_checkpoint:  # every step on the CPU
            bad = window.sync()  # checked before this step's update and before anything is saved
            if bad is not None:
                where = f"last good checkpoint kept at {last_dir}" if (last_dir / "config.json").is_file() \
                    else "no checkpoint was written yet"
                raise LidcsegError(f"non-finite loss at step {bad}; {where}")
        optimizer.step()
        window.tick(lr, beta, x.shape[0] * dist.world)
        notify(TrainEvent("step", done, cfg.steps, {**window.latest, "lr": lr, "it_s": window.it_s()}))

        if is_log:
            row = window.flush()
            if dist.main:
                append_jsonl(metrics_path, {"split": "train", "step": done, **row,
                                            "time_s": round(time.perf_counter() - t_start, 3)})
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
        if is_checkpoint:
            rng = gather_rng(dist)
            if dist.main:
                with atomic_dir(last_dir) as d:
                    save_model(d, model, done, None, cfg)
                    save_state(d, optimizer, done, best, cfg, rng, dist)
                notify(TrainEvent("checkpoint", done, cfg.steps, {}, last_dir))
            dist.barrier()
    if dist.main and cfg.prior_refit_steps and has_prior_net(model_cfg):
        def on_refit(kind: str, step: int, numbers: Mapping[str, float], path: Path | None) -> None:
            notify(TrainEvent(kind, step, cfg.prior_refit_steps, numbers, path))

        batches = candidate_batches(eval_split(train_path, cfg, scenes), scenes, cfg, device)
        run_prior_refit(model_cfg, cfg, out_dir, device, batches=batches, callback=on_refit,
                        validate=lambda m: validate(m, val_batches, cfg, device, autocast, scenes),
                        criterion=refit_criterion(scenes))
    dist.barrier()
    notify(TrainEvent("done", cfg.steps, cfg.steps, {}, out_dir))
    return out_dir


def training_loader(
    train_ds: Any, cfg: TrainConfig, device: torch.device, dist: Dist | None = None, start: int = 0
) -> torch.utils.data.DataLoader:
    """The batches of steps ``start .. cfg.steps - 1`` for this rank: ``batch_size / world``
    samples each, in ``cfg.num_workers`` worker processes, pinned when ``device`` is CUDA."""
    from lidcseg.data.dataset import StreamSampler

    dist = dist or Dist()
    return torch.utils.data.DataLoader(
        train_ds,
        batch_size=cfg.batch_size // dist.world,
        sampler=StreamSampler(cfg.batch_size, start, cfg.steps, dist.rank, dist.world),
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",  # page-locked batches: asynchronous copies to the GPU
        # One pass over one sampler serves the whole run, so workers never need to persist.
        persistent_workers=False,
        # The loader's own seed draw must not consume the global RNG, which is part of
        # the restored state (samples carry their own augmentation seeds).
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def device_augment_for(train_ds: Any) -> DeviceAugment | None:
    """The batched augmentation :func:`batch_to_device` applies, or None.

    A :class:`~lidcseg.data.dataset.CropTrainDataset` with ``augment_on="device"`` (and
    augmentation on) hands out whole crops; their tiles are augmented on the training
    device with the same distribution of transforms (:mod:`lidcseg.data.device_augment`).
    The flip task's scenes always augment in the loader.
    """
    if not getattr(train_ds, "augments_on_device", False):
        return None
    from lidcseg.data.device_augment import DeviceAugment  # MONAI: only when it is used

    return DeviceAugment(train_ds.augment_params, train_ds.input_size)


def batch_to_device(
    batch: Mapping[str, torch.Tensor],
    device: torch.device,
    channels_last: bool = False,
    augment: DeviceAugment | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One training batch on the training device: the one place where batches cross over.

    The DataLoader pins its batches on CUDA (``pin_memory``), so the copies are
    asynchronous (``non_blocking``): the host goes on queueing work.

    Args:
        batch: a DataLoader batch: ``image`` (B, C_in, T, T) float32, ``mask`` (B, T, T)
            int64, and ``ignore`` (B, T, T) bool for the flip task's scenes.
        device: the training device.
        channels_last: give the images the channels-last memory format (as the model).
        augment: with ``TrainConfig.augment_on = "device"`` (:func:`device_augment_for`), the
            batch holds whole crops (``crop``, ``crop_mask``, ``aug_seed``), augmented here,
            batched on ``device``, into the loader path's ``image``/``mask`` tiles.

    Returns:
        ``(x, y, ignore)`` on ``device``; ``ignore`` None when the batch has none.
    """
    if augment is not None:
        batch = augment.augment_batch(batch, device)
    x = batch["image"].to(device, non_blocking=True)
    y = batch["mask"].to(device, non_blocking=True)
    ignore = batch["ignore"].to(device, non_blocking=True) if "ignore" in batch else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y, ignore


class _LossForward(nn.Module):
    """Routes ``forward`` to ``model.loss`` so DDP (which hooks ``forward``) syncs gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, ignore: torch.Tensor | None = None,
        noise_scale: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if noise_scale is None:
            return self.model.loss(x, y, ignore)
        return self.model.loss(x, y, ignore, noise_scale=noise_scale)
