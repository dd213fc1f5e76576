"""Loss terms as pure functions: cross-entropy, KL of diagonal Gaussians, the ELBO's terms (Eq. 4), M-Heads.

These are pure functions; the trainer weights them: it owns beta. A model's
``loss`` returns the terms (``rec``, and ``kl``/``kl_per_dim`` for latent
models) and :func:`lidcseg.training.schedule.objective` builds
``rec + beta_t * KL`` from them, with the beta schedule and free bits.

Reduction convention (every model of the harness follows it): the
cross-entropy is **summed over the pixels of an image and averaged over the
batch**, and the KL is summed over latent dimensions and averaged over the
batch. Each term of a batch is therefore the mean per-image term, and beta
never depends on the batch size (the public PyTorch port summed the
reconstruction term over the batch, which silently turned beta into beta/B).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pixel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy summed over the pixels of each image.

    Args:
        logits: (B, C, H, W) class logits.
        target: (B, H, W) int64 labels in [0, C); values at ignored pixels are not read.
        ignore: (B, H, W) bool, True for pixels excluded from the sum, or None.

    Returns:
        (B,) per-image sums. An image with every pixel ignored contributes 0.
    """
    if ignore is not None:
        target = target.masked_fill(ignore, 0)
    ce = F.cross_entropy(logits, target, reduction="none")  # (B, H, W)
    if ignore is not None:
        ce = ce.masked_fill(ignore, 0.0)
    return ce.flatten(1).sum(1)


def std_normal_log_prob(eps: torch.Tensor) -> torch.Tensor:
    """log N(eps; 0, I) summed over the last (latent) dimension: (..., N) -> (...)."""
    return -0.5 * (eps**2).sum(-1) - 0.5 * eps.shape[-1] * math.log(2 * math.pi)


def diag_gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logsigma: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(sigma^2)) summed over the last (latent) dimension: (..., N) -> (...).

    ``mu`` and ``logsigma`` broadcast against ``z`` (e.g. (B, 1, N) against (B, n, N)).
    """
    eps = (z - mu) * torch.exp(-logsigma)
    return (-0.5 * eps**2 - logsigma - 0.5 * math.log(2 * math.pi)).sum(-1)


def kl_diag_gaussians(
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
) -> torch.Tensor:
    """KL(Q || P) of axis-aligned Gaussians, per dimension, in closed form.

    KL = log(sigma_p / sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2.

    Args:
        mu_q, logsigma_q, mu_p, logsigma_p: (B, N) means and log standard deviations.

    Returns:
        (B, N) non-negative KL per latent dimension.
    """
    var_ratio = torch.exp(2.0 * (logsigma_q - logsigma_p))  # sigma_q^2 / sigma_p^2
    mean_term = ((mu_q - mu_p) * torch.exp(-logsigma_p)) ** 2
    return 0.5 * (var_ratio + mean_term - 1.0) - (logsigma_q - logsigma_p)


def elbo_terms(
    logits: torch.Tensor,
    target: torch.Tensor,
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
    ignore: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The two terms of the Probabilistic U-Net's training loss (Kohl et al. 2018, Eq. 4).

    L = E_{z~Q(.|Y,X)}[-log P_c(Y | S(X, z))] + beta * KL(Q(z|Y,X) || P(z|X)),
    with the expectation estimated by one reparameterised posterior sample
    (``logits`` are the network's output for that sample). beta is the
    trainer's (:func:`lidcseg.training.schedule.objective`).

    The cross-entropy is SUMMED over pixels per image, then AVERAGED over the
    batch; the KL is summed over latent dimensions and averaged over the batch.
    Repeating a batch k times leaves every value unchanged.

    Args:
        logits: (B, C, H, W) logits from a posterior sample z ~ Q.
        target: (B, H, W) int64 labels.
        mu_q, logsigma_q: (B, N) posterior mean and log sigma.
        mu_p, logsigma_p: (B, N) prior mean and log sigma.
        ignore: (B, H, W) bool, True for pixels excluded from the cross-entropy.

    Returns:
        ``rec`` (scalar, the cross-entropy term), ``kl`` (scalar), ``kl_per_dim``
        (N,) batch-mean KL of each latent dimension (detached).
    """
    rec = pixel_cross_entropy(logits, target, ignore).mean()
    kl_bn = kl_diag_gaussians(mu_q, logsigma_q, mu_p, logsigma_p)  # (B, N)
    kl = kl_bn.sum(1).mean()
    return {"rec": rec, "kl": kl, "kl_per_dim": kl_bn.detach().mean(0)}


def m_heads_weights(ce: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Per-head loss weights of M-Heads (Kohl et al. 2018, Fig. 2c; Rupprecht et al. 2017).

    For each image, the head with the lowest cross-entropy gets weight 1 - epsilon
    and every other head epsilon / (M - 1), so that the heads specialise but none
    is starved of gradient. Ties go to the lowest head index; with M = 1 the single
    head has weight 1.

    Args:
        ce: (B, M) cross-entropy of each head for each image (its gradient is not used).
        epsilon: the weight shared by the M - 1 other heads (paper: 0.05).

    Returns:
        (B, M) weights, each row summing to 1, without gradient.
    """
    b, m = ce.shape
    if m == 1:
        return torch.ones_like(ce)
    weights = torch.full_like(ce, epsilon / (m - 1))
    best = ce.detach().argmin(dim=1, keepdim=True)  # (B, 1)
    return weights.scatter(1, best, 1.0 - epsilon).detach()


def m_heads_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    epsilon: float,
    ignore: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The M-Heads training loss: a weighted sum of the heads' cross-entropies.

    L = mean_b sum_m w_bm CE(S_m(X_b), Y_b), with w from :func:`m_heads_weights`
    (best head per image 1 - epsilon, the others epsilon / (M - 1)); each CE is
    summed over pixels, as everywhere in this module.

    Args:
        logits: (B, M, C, H, W) logits of the M heads.
        target: (B, H, W) int64 labels.
        epsilon: see :func:`m_heads_weights`.
        ignore: (B, H, W) bool, True for pixels excluded from the cross-entropy.

    Returns:
        ``rec`` (scalar, the weighted cross-entropy: the whole loss), ``rec_best``
        (batch mean of the best head's CE, detached) and ``best_head`` ((M,) share
        of the batch's images on which each head was the best, detached).
    """
    b, m = logits.shape[:2]
    if ignore is not None:
        target = target.masked_fill(ignore, 0)
    ce = F.cross_entropy(
        logits.transpose(1, 2), target[:, None].expand(-1, m, -1, -1), reduction="none"
    )  # (B, M, H, W)
    if ignore is not None:
        ce = ce.masked_fill(ignore[:, None], 0.0)
    ce = ce.flatten(2).sum(2)  # (B, M)
    weights = m_heads_weights(ce, epsilon)
    rec = (weights * ce).sum(1).mean()
    best = ce.detach().argmin(1)
    return {
        "rec": rec,
        "rec_best": ce.detach().min(1).values.mean(),
        "best_head": torch.bincount(best, minlength=m).to(ce.dtype) / b,
    }
