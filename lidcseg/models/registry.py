"""The harness interface every model implements, ``create_model(cfg)`` and ``model_config(name)``.

Every model (the Probabilistic U-Net, its ablations of Appendix D, and the
baselines of the paper's Fig. 2: Dropout U-Net, U-Net ensemble, M-Heads,
Image2Image VAE) is an ``nn.Module`` subclass of :class:`SegmentationModel`:

- ``__init__(cfg: ModelConfig)`` and the attribute ``config`` (what a
  checkpoint stores to rebuild the model);
- ``loss(x, y, ignore=None, generator=None) -> dict[str, Tensor]`` for
  training: the loss's *terms*, never weighted by beta. ``rec`` (scalar,
  differentiable) is the reconstruction (cross-entropy) part, the whole loss
  of a model without a latent; latent models add ``kl`` (scalar,
  differentiable) and ``kl_per_dim`` (N,). The trainer owns beta and builds
  the objective ``rec + beta_t * KL`` (:func:`lidcseg.training.schedule.objective`).
  ``generator`` seeds the loss's own noise (posterior sample, dropout masks);
- ``sample(x, n, generator=None, eps=None) -> (B, n, C, H, W)`` logits of ``n``
  hypotheses per image, computed without gradients; ``noise_dim`` is the width N
  of ``eps`` (B, n, N), ``max_samples`` the most hypotheses a model has (members,
  heads) and ``samples_per_count`` says whether ``sample(x, n)`` gives n fixed
  members (evaluated once per count).

Shapes: ``x`` (B, C_in, H, W) float; ``y`` (B, H, W) int64 class labels;
``ignore`` (B, H, W) bool, True where a pixel is excluded from the loss.

Model names: each is a class plus the ``ModelConfig`` options the name
*implies* (always applied by :func:`create_model`: ``fixed-prior`` is the
Prob. U-Net with ``prior="fixed"``) and the name's own *defaults* per task
(applied by :func:`model_config`, overridable): ``i2i-vae`` defaults to beta = 10
and N = 3 on LIDC, the paper's best Image2Image VAE (Appendix H.1), and to
beta = 1 on the flip task, as on Cityscapes (Appendix H.2; N stays 3: the paper
changes only beta there). Build the config of a named model with
``model_config(name, base, task)``; :data:`MODEL_SPECS` lists them all.

Models are registered as ``"module:Class"`` strings and imported on demand,
so model modules may import this one.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lidcseg.config import MODEL_SUMMARIES, ModelConfig
from lidcseg.errors import LidcsegError
from lidcseg.presets import TASKS


@dataclass(frozen=True)
class ModelSpec:
    """A registered model name.

    Attributes:
        target: ``"module:Class"`` of the model.
        summary: one line: what the model is, with the paper's figure.
        implies: ModelConfig fields the name fixes (applied by :func:`create_model`).
        defaults: per task (a key of :data:`lidcseg.presets.TASKS`), the ModelConfig
            fields the name changes by default there (applied by :func:`model_config`;
            a later override wins); a task not listed gets none.
    """

    target: str
    summary: str
    implies: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


_PROB_UNET = "lidcseg.models.prob_unet:ProbUNet"
_ENSEMBLE = "lidcseg.models.ensemble:UNetEnsemble"

#: Every model name of the harness (``ModelConfig.name``, ``lidcseg train --model``).
MODEL_SPECS: dict[str, ModelSpec] = {
    "probunet": ModelSpec(_PROB_UNET, MODEL_SUMMARIES["probunet"]),
    "fixed-prior": ModelSpec(_PROB_UNET, MODEL_SUMMARIES["fixed-prior"], {"prior": "fixed"}),
    "fixed-prior-no-context": ModelSpec(
        _PROB_UNET, MODEL_SUMMARIES["fixed-prior-no-context"],
        {"prior": "fixed", "posterior_context": False},
    ),
    "early-injection": ModelSpec(_PROB_UNET, MODEL_SUMMARIES["early-injection"], {"injection": "early"}),
    "dropout-unet": ModelSpec("lidcseg.models.dropout_unet:DropoutUNet", MODEL_SUMMARIES["dropout-unet"]),
    "unet": ModelSpec(_ENSEMBLE, MODEL_SUMMARIES["unet"], {"ensemble_size": 1}),
    "unet-ensemble": ModelSpec(_ENSEMBLE, MODEL_SUMMARIES["unet-ensemble"]),
    "m-heads": ModelSpec("lidcseg.models.m_heads:MHeadsUNet", MODEL_SUMMARIES["m-heads"]),
    "i2i-vae": ModelSpec(
        "lidcseg.models.i2i_vae:Image2ImageVAE", MODEL_SUMMARIES["i2i-vae"],
        {"prior": "fixed", "posterior_context": False, "injection": "early"},
        # Appendix H.1: beta = 10, N = 3 (the best of the paper's sweep on LIDC). Appendix H.2
        # sets beta = 1 on Cityscapes and names no other change, so N stays 3 there.
        {"lidc": {"beta": 10.0, "latent_dim": 3}, "flip-scenes": {"beta": 1.0, "latent_dim": 3}},
    ),
}

#: Valid values of ``ModelConfig.name``.
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_SPECS)


class SegmentationModel(nn.Module, abc.ABC):
    """Base class of every model in the harness (see the module docstring)."""

    config: ModelConfig
    #: Whether ``sample(x, n)`` returns n fixed members (no randomness), so that an
    #: evaluation at several counts calls it once per count (n members each) instead
    #: of taking the first n of one draw (the U-Net ensemble).
    samples_per_count: bool = False
    #: Whether ``loss`` takes ``noise_scale``, the scale of its posterior sample's noise
    #: (``TrainConfig.posterior_noise_warmup_steps``): models with a posterior net.
    scales_posterior_noise: bool = False

    @property
    def max_samples(self) -> int | None:
        """Most hypotheses ``sample`` gives per image (ensemble members, heads); None: any number."""
        return None

    @property
    def noise_dim(self) -> int:
        """N, the width of the noise ``eps`` (B, n, N) that ``sample`` takes: the latent
        dimension (at least 1; models without a latent take and ignore it)."""
        return max(1, int(self.config.latent_dim or 1))

    @abc.abstractmethod
    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        ignore: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The terms of a batch's training loss (the trainer weights them).

        Args:
            x: (B, C_in, H, W) images.
            y: (B, H, W) int64 labels in [0, C).
            ignore: (B, H, W) bool, True for pixels left out of the loss, or None.
            generator: RNG of the loss's own noise (None: torch's global RNG).

        Returns:
            A dict with at least ``rec`` (scalar, differentiable: the reconstruction
            term, the whole loss of a model without a latent); latent models add
            ``kl`` (scalar, differentiable) and ``kl_per_dim`` (N,).
        """

    @abc.abstractmethod
    def sample(
        self,
        x: torch.Tensor,
        n: int,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``n`` segmentation hypotheses per image, as logits (B, n, C, H, W), without gradients.

        ``eps`` (B, n, N), when given, is the standard-normal noise of the
        hypotheses instead of a fresh draw: hypothesis k of every image then
        uses the same noise (``lidcseg sample`` shares it across a lesion's
        slices). Models without a latent ignore it.
        """


def check_labels(x: torch.Tensor, y: torch.Tensor) -> None:
    """Refuse labels that are not (B, H, W) int64 matching images (B, C_in, H, W).

    Raises:
        ValueError: naming both shapes (or the dtype).
    """
    if y.ndim != 3 or y.shape[0] != x.shape[0] or y.shape[1:] != x.shape[2:]:
        raise ValueError(
            f"labels must be (B, H, W) matching images {tuple(x.shape)}, got {tuple(y.shape)}"
        )
    if y.dtype != torch.long:
        raise ValueError(f"labels must be int64, got {y.dtype}")


def check_sample_count(n: int, available: int, name: str, what: str) -> None:
    """Refuse ``n`` hypotheses from a model that has only ``available`` (members, heads).

    Raises:
        ValueError: n < 1.
        LidcsegError: n > available, naming the model and how to get more.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > available:
        raise LidcsegError(
            f"model {name!r} gives at most {available} hypotheses (one per {what}), "
            f"{n} were asked for; train it with more {what}s"
        )


def _spec(name: str) -> ModelSpec:
    spec = MODEL_SPECS.get(name)
    if spec is None:
        raise LidcsegError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return spec


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the options its name implies (``fixed-prior``: ``prior="fixed"``).

    Raises:
        LidcsegError: the name is unknown; the message lists the valid names.
    """
    implies = _spec(cfg.name).implies
    if all(getattr(cfg, k) == v for k, v in implies.items()):
        return cfg
    return dataclasses.replace(cfg, **implies)


def model_config(
    name: str, base: ModelConfig | None = None, task: str = "lidc", **overrides: Any
) -> ModelConfig:
    """The config of the model ``name``: ``base`` (default ``ModelConfig()``) with the
    name, the options it implies, its own defaults on ``task``, then ``overrides``.

    ``model_config("i2i-vae", preset_cfg)`` keeps the preset's architecture
    (channels, scales) and sets beta = 10, N = 3 and the Image2Image VAE's options;
    ``model_config("i2i-vae", preset_cfg, "flip-scenes")`` sets beta = 1 instead (H.2).

    Args:
        name: a key of :data:`MODEL_SPECS`.
        base: the config to start from (a preset's model).
        task: a key of :data:`lidcseg.presets.TASKS`; picks the name's defaults.
        overrides: ModelConfig fields set last.

    Raises:
        LidcsegError: the name or task is unknown, or an override contradicts what the name implies.
    """
    spec = _spec(name)
    if task not in TASKS:
        raise LidcsegError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    clash = {k: v for k, v in overrides.items() if k in spec.implies and spec.implies[k] != v}
    if clash:
        raise LidcsegError(
            f"model {name!r} implies {', '.join(f'{k}={spec.implies[k]!r}' for k in clash)}"
        )
    defaults = spec.defaults.get(task, {})
    cfg = dataclasses.replace(base or ModelConfig(), **{"name": name, **defaults, **overrides})
    return resolve_config(cfg)


def create_model(cfg: ModelConfig) -> SegmentationModel:
    """Build the model named by ``cfg.name``, freshly initialised.

    The options the name implies are applied first (:func:`resolve_config`), so
    ``model.config`` may differ from ``cfg`` in those fields only. Initialisation
    draws from torch's global RNG: seed it with
    :func:`lidcseg.seed.seed_everything` for a reproducible model.

    Raises:
        LidcsegError: the name is unknown; the message lists the valid names.
    """
    cfg = resolve_config(cfg)
    module_name, class_name = _spec(cfg.name).target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(cfg)
