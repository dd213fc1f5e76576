"""The schedules of a run and the objective it minimises: learning rate, beta, posterior noise, Eq. 4.

The trainer owns beta: a model's ``loss`` returns the terms only (``rec``, and
``kl`` for latent models, see :mod:`lidcseg.losses`), and :func:`objective`
weights them with the KL weight ``beta_t`` of the step (:func:`beta_at`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lidcseg.config import ModelConfig, TrainConfig
from lidcseg.errors import LidcsegError


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
    """KL weight of step ``step`` (0-based): ``beta * min(1, (step + 1) / beta_warmup_steps)``,
    a linear warm-up over ``beta_warmup_steps``, then ``beta``."""
    if cfg.beta_warmup_steps <= 0:
        return beta
    return beta * min(1.0, (step + 1) / cfg.beta_warmup_steps)


def noise_scale_at(step: int, cfg: TrainConfig) -> float | None:
    """Scale a_t of the posterior sample's noise at step ``step`` (0-based):
    ``min(1, step / posterior_noise_warmup_steps)``, so z = mu_q + a_t sigma_q eps.

    None when there is no warm-up (the paper's full sample from the first step): the
    model's ``loss`` then runs exactly as without the option.
    """
    if cfg.posterior_noise_warmup_steps <= 0:
        return None
    return min(1.0, step / cfg.posterior_noise_warmup_steps)


def elbo(terms: Mapping[str, torch.Tensor], beta: float) -> torch.Tensor:
    """The negative ELBO of Eq. 4 at weight ``beta``: ``rec + beta * kl`` (``rec`` without a KL).

    Args:
        terms: a model's ``loss`` output: scalar ``rec``, and scalar ``kl`` for latent models.
        beta: the KL weight (``ModelConfig.beta``).

    Returns:
        A scalar, differentiable where the terms are.
    """
    rec, kl = terms["rec"], terms.get("kl")
    return rec if kl is None else rec + beta * kl


def objective(
    terms: Mapping[str, torch.Tensor], beta: float, model_cfg: ModelConfig, cfg: TrainConfig
) -> torch.Tensor:
    """The scalar to back-propagate: ``rec + beta_t * max(kl, N * kl_free_bits)`` (Eq. 4).

    The paper's setting (no free bits, ``beta`` = ``model_cfg.beta``, i.e. no
    warm-up at this step) is the ELBO, :func:`elbo` ``(terms, model_cfg.beta)``,
    computed in the same order and dtype. Otherwise the KL term is floored at
    N * ``kl_free_bits`` nats (free bits, Kingma et al. 2016: below the floor
    the KL gets no gradient) and weighted by the step's ``beta``, in float32.
    Models without ``kl`` minimise ``rec``.

    Raises:
        LidcsegError: the terms have no ``rec``.

    Args:
        terms: a model's ``loss`` output (batch means, :mod:`lidcseg.losses`).
        beta: beta_t, the KL weight of this step (:func:`beta_at`).
        model_cfg: ``beta`` (the paper-setting check) and ``latent_dim`` (N).
        cfg: ``kl_free_bits``.
    """
    if "rec" not in terms:
        raise LidcsegError(f"model {model_cfg.name!r} returned no 'rec' term from its loss")
    if "kl" not in terms or (cfg.kl_free_bits == 0 and beta == model_cfg.beta):
        return elbo(terms, model_cfg.beta)
    floor = cfg.kl_free_bits * model_cfg.latent_dim
    return terms["rec"].float() + beta * torch.clamp(terms["kl"].float(), min=floor)
