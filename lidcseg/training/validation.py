"""Validation during training: GED on the validation split, and the flip task's calibration.

Hypotheses are drawn through :mod:`lidcseg.inference` (the one place models
are sampled), from a generator the trainer seeds with ``cfg.seed`` at every
call, so two checkpoints are compared on the same noise and the training RNG
is untouched.

* LIDC (:func:`validate`): GED of Eq. 6 (V-statistic, d = 1 - IoU of the
  foreground, :func:`lidcseg.inference.draw_foreground`) against the graders.
* The flip task of Section 4.2 (:func:`validate_flip_task`): Eq. 7 against the
  exact 32-mode mixture and the calibration numbers
  (:class:`lidcseg.metrics.flips.CalibrationAccumulator`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lidcseg.config import TrainConfig
from lidcseg.flips import NUM_CLASSES
from lidcseg.inference import draw_foreground, draw_labels
from lidcseg.metrics.flips import CalibrationAccumulator
from lidcseg.metrics.ged import ged_terms


def load_val(ds: Any, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (capped) validation split in memory: ``(images (b, 1, T, T), masks (b, G, T, T) bool)``."""
    batches = []
    for s in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(s, min(s + batch_size, len(ds)))]
        batches.append((torch.stack([it["image"] for it in items]),
                        torch.stack([it["masks"] for it in items]).bool()))
    return batches


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, ...]],
    cfg: TrainConfig,
    device: torch.device,
    autocast: contextlib.AbstractContextManager[Any],
    scenes: bool = False,
) -> dict[str, float]:
    """GED@``val_samples`` (Eq. 6, V-statistic, d = 1 - IoU) and sample diversity on val.

    On the flip task (``scenes``) the GED is Eq. 7 against the exact 32-mode mixture,
    with the calibration numbers beside it (:func:`validate_flip_task`).
    ``val_samples`` is capped at the model's ``max_samples`` (ensemble members, heads).

    The latents come from a generator seeded with ``cfg.seed`` at every call, so
    two checkpoints are compared on the same noise, and the training RNG is untouched.

    Args:
        model: a harness model, put in eval mode here.
        batches: LIDC: ``(images (b, 1, T, T), masks (b, G, T, T) bool)`` (:func:`load_val`);
            scenes: see :func:`validate_flip_task`.
        cfg: ``val_samples``, ``seed``, ``channels_last``.
        device: where the model runs.
        autocast: the trainer's autocast context.
        scenes: the flip task instead of LIDC.

    Returns:
        ``ged``, ``diversity`` (E d(S, S')), ``graders`` (E d(Y, Y')), ``cross``
        (E d(S, Y)), ``pixels_varying`` (fraction of pixels whose label differs
        between samples), ``crops``, ``samples``, ``time_s``.
    """
    t0 = time.perf_counter()
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    cap = model.max_samples
    n_samples = cfg.val_samples if cap is None else min(cfg.val_samples, cap)
    if scenes:
        return validate_flip_task(model, batches, n_samples, device=device, generator=gen,
                                  autocast=autocast, channels_last=cfg.channels_last)
    sums = dict.fromkeys(("ged", "diversity", "graders", "cross", "pixels_varying"), 0.0)
    n = 0
    for images, masks in batches:
        x = _inputs(images, device, cfg.channels_last)
        with autocast:
            samples = draw_foreground(model, x, n_samples, generator=gen).cpu()  # (b, n, T, T)
        terms = ged_terms(samples, masks)
        varying = (samples.any(1) & ~samples.all(1)).flatten(1).float().mean(1)
        for k, v in (("ged", terms.ged), ("diversity", terms.samples), ("graders", terms.graders),
                     ("cross", terms.cross), ("pixels_varying", varying)):
            sums[k] += float(v.sum())
        n += x.shape[0]
    out = {k: v / n for k, v in sums.items()}
    out.update(crops=float(n), samples=float(n_samples), time_s=time.perf_counter() - t0)
    return out


def _inputs(images: torch.Tensor, device: torch.device | str, channels_last: bool) -> torch.Tensor:
    """Images (b, C_in, H, W) on ``device``, channels-last if asked."""
    x = images.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def validate_flip_task(
    model: Any,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_samples: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Validation of ``lidcseg train`` on the flip task: Eq. 7 at ``n_samples`` and calibration.

    Args:
        model: a harness model (``sample``), put in eval mode here.
        batches: ``(images (b, 3, H, W), labels (b, H, W) un-flipped, ignore (b, H, W))``
            (:meth:`lidcseg.data.scenes.SceneEvalDataset.batches`).
        n_samples: samples per scene (the paper: 16).
        device: where the model runs.
        generator: the latent noise (seed it identically at every call to compare checkpoints).
        autocast: e.g. ``torch.autocast("cuda", dtype=torch.bfloat16)``.
        channels_last: feed the images channels-last.

    Returns:
        ``ged``, ``diversity`` (E d(S,S')), ``graders`` (E d(Y,Y') over the modes),
        ``cross`` (E d(S,Y)), ``pixels_varying``, ``mode_r``, ``mode_mae``,
        ``flip_mae``, ``crops``, ``samples``, ``time_s`` - the keys of the LIDC
        validation plus the calibration numbers.

    Raises:
        LidcsegError: the model's samples have another shape or not the task's 24 classes.
    """
    t0 = time.perf_counter()
    if hasattr(model, "eval"):
        model.eval()
    acc = CalibrationAccumulator(counts=(n_samples,), samples=n_samples)
    varying = 0.0
    for images, labels, ignore in batches:
        x = _inputs(images, device, channels_last)
        with autocast if autocast is not None else contextlib.nullcontext():
            samples = draw_labels(model, x, n_samples, generator=generator, classes=NUM_CLASSES,
                                  task="the flip task").cpu()  # (b, n, H, W)
        acc.update(samples, labels, ignore)
        varying += float(((samples != samples[:, :1]).any(1) & ~ignore).flatten(1).float().mean(1).sum())
    res = acc.result()
    g = res["ged"][str(n_samples)]
    return {"ged": g["mean"], "diversity": g["diversity"], "graders": g["modes"], "cross": g["cross"],
            "pixels_varying": varying / max(acc.images, 1), "mode_r": res["modes"]["pearson_r"],
            "mode_mae": res["modes"]["mae"], "flip_mae": res["pixels"]["mae"],
            "crops": float(acc.images), "samples": float(n_samples), "time_s": time.perf_counter() - t0}
