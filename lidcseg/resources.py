"""Resource requests, checked before anything is allocated: one memory estimate, one refusal.

A request that needs more memory than the machine has (``sample -n 20000``, a
NIfTI header claiming 10^13 voxels) is refused in one line that names the request,
the estimate and the limit, instead of a ``MemoryError`` or the kernel's
out-of-memory killer halfway through. The limit is the machine's physical memory
(a CUDA device's for a model call there). The estimates are upper bounds of the
largest allocations, good to a factor of about two: they catch requests that are
orders of magnitude too large, not borderline ones.

Configuration values that are resource requests have their bounds here too
(:data:`MODEL_LIMITS`, :data:`MAX_PARAMETERS`, :data:`TRAIN_LIMITS`), checked by the
config dataclasses' ``__post_init__``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lidcseg.errors import LidcsegError

#: Assumed memory when the machine's cannot be read (bytes).
FALLBACK_MEMORY_BYTES = 16 << 30


def memory_bytes(device: Any = None) -> int:
    """Memory of ``device``: a CUDA device's total memory, else this machine's physical memory."""
    if device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        try:
            return int(torch.cuda.get_device_properties(device).total_memory)
        except (RuntimeError, AssertionError, ValueError):
            return FALLBACK_MEMORY_BYTES
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return FALLBACK_MEMORY_BYTES
    return int(pages) * int(size) if pages > 0 and size > 0 else FALLBACK_MEMORY_BYTES


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``12 MiB``, ``3.1 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


def check_memory(need: float, request: str, hint: str, *, device: Any = None,
                 where: str | Path | None = None) -> None:
    """Refuse ``request`` when its estimated ``need`` (bytes) exceeds :func:`memory_bytes`.

    Args:
        need: the estimate in bytes.
        request: what was asked for, for the message (``-n 20000 hypotheses of 5 tiles``).
        hint: how to recover (``lower -n or --batch-size``).
        device: where the memory is needed (a CUDA device, or None for this machine).
        where: the file the request comes from, if any.

    Raises:
        LidcsegError: ``<request> needs about X of memory, more than the Y of <device>; <hint>``.
    """
    limit = memory_bytes(device)
    if need > limit:
        what = f"the CUDA device {device}" if limit and device is not None and "cuda" in str(device) \
            else "this machine"
        raise LidcsegError(
            f"{request} needs about {format_bytes(need)} of memory, more than the "
            f"{format_bytes(limit)} of {what}; {hint}", where,
        )


def hypothesis_bytes(side: int, config: Any = None) -> int:
    """Memory of one hypothesis of one ``side`` x ``side`` image inside a model call (bytes).

    Per pixel: float32 logits (``num_classes``), f_comb's input and two of its
    layers, the U-Net activations a model that runs once per sample keeps
    (``2 * base_channels``) and the bool mask. ``config`` is a
    :class:`~lidcseg.config.ModelConfig` (None: a model without one, logits only).
    """
    if config is None:
        return side * side * (4 * 2 + 1)
    c = (config.num_classes + config.latent_dim + 2 * config.fcomb_channels
         + 2 * config.base_channels)
    return side * side * (4 * c + 1)


# -- configuration values that are resource requests -------------------------------------------

#: (least, most) of every integer field of :class:`~lidcseg.config.ModelConfig`. The least
#: makes a model; the most bounds what one machine can hold (the paper uses base 32, 5 scales,
#: N = 6, 16 ensemble members or heads). ``num_scales`` 12 already needs inputs of 2048 pixels.
MODEL_LIMITS: dict[str, tuple[int, int]] = {
    "in_channels": (1, 64), "num_classes": (2, 1024), "base_channels": (1, 4096),
    "num_scales": (1, 12), "convs_per_block": (1, 32), "latent_dim": (1, 1024),
    "fcomb_channels": (1, 4096), "fcomb_layers": (1, 64), "ensemble_size": (1, 256),
    "num_heads": (1, 1024),
}
#: Most parameters a model may have: 2e9 float32 weights are 8 GB, four times that in training.
MAX_PARAMETERS = 2_000_000_000
#: (least, most) of the integer fields of :class:`~lidcseg.config.TrainConfig` that allocate or
#: start something (tiles, samples, worker processes, threads) and of the counts that must be >= 1.
TRAIN_LIMITS: dict[str, tuple[int, int]] = {
    "steps": (1, 10**12), "batch_size": (1, 65536), "input_size": (1, 8192), "log_every": (1, 10**12),
    "val_samples": (1, 4096), "val_max_crops": (1, 10**9), "val_batch_size": (1, 65536),
    "checkpoint_every": (1, 10**12), "lr_decay_steps": (0, 1000), "seed": (0, 2**63 - 1),
    "aug_max_shift": (0, 8192), "beta_warmup_steps": (0, 10**12),
    "posterior_noise_warmup_steps": (0, 10**12), "num_workers": (0, 1024),
    "val_every": (0, 10**12), "threads": (0, 4096), "aug_elastic_spacing": (1, 8192),
    "prior_refit_steps": (0, 10**12), "prior_refit_samples": (2, 65536), "prior_refit_batch_size": (1, 65536),
    "prior_refit_val_every": (0, 10**12),
}


def check_ranges(cfg: Any, limits: dict[str, tuple[int, int]]) -> None:
    """Refuse an integer field of the dataclass ``cfg`` outside its (least, most), and any
    non-finite float field, naming the field and the limit."""
    import dataclasses
    import math

    kind = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise LidcsegError(f"{kind}.{f.name} must be a finite number, got {v}")
    for name, (lo, hi) in limits.items():
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise LidcsegError(f"{kind}.{name} must be an integer, got {v!r}")
        if not lo <= v <= hi:
            raise LidcsegError(f"{kind}.{name} must be {lo} to {hi}, got {v}")


def parameter_estimate(cfg: Any) -> int:
    """About the parameter count of the model of a ModelConfig, from above (measured: the
    harness models have 0.4 to 1 times this): three U-Net halves of ``convs_per_block``
    3x3 convolutions per scale, per ensemble member, plus f_comb per head."""
    convs = sum(9 * cfg.convs_per_block * (cfg.base_channels * 2**s) ** 2 for s in range(cfg.num_scales))
    members = cfg.ensemble_size if cfg.name == "unet-ensemble" else 1
    heads = cfg.num_heads if cfg.name == "m-heads" else 1
    f = cfg.fcomb_channels
    fcomb = heads * f * (cfg.base_channels + cfg.latent_dim + cfg.fcomb_layers * f + cfg.num_classes)
    return 3 * members * convs + fcomb


def check_model_size(cfg: Any) -> None:
    """Refuse a ModelConfig with a field outside :data:`MODEL_LIMITS` or over :data:`MAX_PARAMETERS`."""
    check_ranges(cfg, MODEL_LIMITS)
    params = parameter_estimate(cfg)
    if params > MAX_PARAMETERS:
        sizes = ["base_channels", "num_scales", "convs_per_block"] + (
            ["ensemble_size"] if cfg.name == "unet-ensemble" else ["num_heads"] if cfg.name == "m-heads" else [])
        raise LidcsegError(
            f"ModelConfig: about {params:.3g} parameters ({', '.join(f'{k} {getattr(cfg, k)}' for k in sizes)}), "
            f"more than the limit of {MAX_PARAMETERS:.3g}; lower {' or '.join(sizes[:2] + sizes[3:])}"
        )


def check_model_call(images: int, n: int, side: int, config: Any = None, *, device: Any = None,
                     hint: str = "lower -n or --batch-size") -> None:
    """Refuse a model call drawing ``n`` hypotheses of ``images`` images of ``side`` pixels
    that would need more memory than ``device`` has (:func:`hypothesis_bytes` each)."""
    check_memory(images * n * hypothesis_bytes(side, config),
                 f"-n {n} samples of {images} {side}x{side} images per model call", hint, device=device)


def check_pairwise(images: int, n: int, graders: int = 4) -> None:
    """Refuse comparing ``n`` samples and the graders of ``images`` images pairwise at once
    (three float32 ``(images, n + graders, n + graders)`` IoU matrices) beyond memory."""
    k = n + graders
    check_memory(12 * images * k * k, f"-n {n} samples of {images} images per batch, compared pairwise",
                 "lower -n or --batch-size")
