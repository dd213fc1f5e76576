"""Where a Prob. U-Net splits each flip in its latent space: why sampled frequencies miss (Section 4.2).

A sample's flips are decided by the region of latent space its z falls in, and
its frequency is the prior mass of that region. The posterior net puts each of
a scene's 32 modes Y_k in a cluster mu_post(X, Y_k), and the decoder learns the
boundaries between clusters only from posterior samples. A flip is sampled at
its probability p only when its boundary cuts off prior mass p.

:func:`flip_boundaries` measures that for every switch i, in units of the prior
(u = (z - mu_prior) / sigma_prior, so the prior is N(0, I)):

* ``flipped_at`` / ``unflipped_at``: where the posterior means of the 16 modes
  with (without) flip i lie along the direction d_i that separates them
  (d_i: the difference of the two groups' mean u, per scene, unit length);
* ``boundary``: the threshold tau along d_i that best predicts which of the
  prior's samples the decoder flips (``flipped iff u . d_i > tau``), and
  ``agreement``, the share of samples that rule gets right (1: a flat boundary
  across d_i; lower: the flip also depends on other directions);
* ``quantile``: Phi^-1(1 - p), where a flat boundary would have to be for the
  prior to sample the flip at p; ``midpoint`` of the two groups;
* ``sampled``: the share of prior samples the decoder flips.

With tight posterior clusters (``sigma_ratio`` = sigma_post / sigma_prior much
below 1) nothing in training places the boundary between them. A boundary
beyond the quantile (``boundary - quantile > 0``) under-samples the flip.

Only models with a prior net, a posterior net and a decoder for given latents
(``prior``, ``posterior_params``, ``decode``) have this geometry.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from statistics import NormalDist
from typing import Any

import torch

from lidcseg.flips import NUM_MODES, SWITCHES, check_unflipped, mode_flips, mode_labels
from lidcseg.metrics.flips import switch_counts

#: Prior samples drawn per scene.
DEFAULT_PRIOR_SAMPLES = 128


def scene_batches(
    images: torch.Tensor, labels: torch.Tensor, ignore: torch.Tensor, batch_size: int,
    device: torch.device | str,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of scenes with their 32 modes: ``(x, labels, ignore, modes)``.

    Args:
        images: (S, 3, H, W) uint8 RGB or normalised float; ``labels`` (S, H, W)
            un-flipped trainIds; ``ignore`` (S, H, W) bool.

    Yields:
        ``x`` (b, 3, H, W) float on ``device``; ``labels`` (b, H, W) int64 with ignored
        pixels set to 0 and ``ignore`` (b, H, W), both on the CPU; ``modes`` (b, 32, H, W).

    Raises:
        LidcsegError: labels that hold a twin class.
    """
    from lidcseg.data.scenes import normalize_rgb

    labels = labels.masked_fill(ignore, 0).to(torch.int64)
    check_unflipped(labels, "labels")
    for s in range(0, labels.shape[0], batch_size):
        x = images[s : s + batch_size]
        x = (normalize_rgb(x) if x.dtype == torch.uint8 else x).to(device)
        lab = labels[s : s + batch_size]
        yield x, lab, ignore[s : s + batch_size], mode_labels(lab)


def has_latent_geometry(model: Any) -> bool:
    """Whether ``model`` has a prior net, a posterior net and ``decode(x, z)``."""
    return all(hasattr(model, a) for a in ("prior", "posterior_params", "decode"))


def best_threshold(proj: torch.Tensor, flipped: torch.Tensor) -> tuple[float, float]:
    """The threshold tau for which ``proj > tau`` agrees best with ``flipped``, and that agreement.

    Args:
        proj: (M,) float projections.
        flipped: (M,) bool decisions.

    Returns:
        ``(tau, agreement)``; tau is the midpoint between the two projections it falls
        between (or one step beyond the extreme one).
    """
    order = torch.argsort(proj)
    p, f = proj[order].double(), flipped[order].double()
    m = p.numel()
    # Threshold below sorted position j (0..m): errors = flipped at or below j-1 + unflipped from j on.
    flipped_below = torch.cat([p.new_zeros(1), torch.cumsum(f, 0)])
    unflipped_above = torch.cat([torch.flip(torch.cumsum(torch.flip(1 - f, [0]), 0), [0]), p.new_zeros(1)])
    errors = flipped_below + unflipped_above
    j = int(torch.argmin(errors))
    if j == 0:
        tau = float(p[0]) - 1.0
    elif j == m:
        tau = float(p[-1]) + 1.0
    else:
        tau = float(p[j - 1] + p[j]) / 2
    return tau, 1.0 - float(errors[j]) / m


def flip_boundaries(
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    ignore: torch.Tensor,
    *,
    prior_samples: int = DEFAULT_PRIOR_SAMPLES,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    min_pixels: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Each flip's posterior clusters and decoder boundary in the prior's units (module docstring).

    Args:
        model: with ``prior(x) -> (mu, log sigma)``, ``posterior_params(x, y, ignore)
            -> (mu, log sigma)`` (each (B, N)) and ``decode(x, z)``: (B, C_in, H, W),
            (B, n, N) -> (B, n, C, H, W) logits.
        images: (S, 3, H, W) uint8 RGB or normalised float; ``labels`` (S, H, W)
            un-flipped trainIds; ``ignore`` (S, H, W) bool.
        prior_samples: latents drawn from the prior per scene.
        min_pixels: pixels switch i's class needs in a scene for the scene to count for i.
        seed: seeds the prior's noise.

    Returns:
        ``{"sigma_ratio": mean sigma_post / sigma_prior, "prior_samples": n, "per_switch":
        [{"class", "probability", "scenes", "sampled", "flipped_at", "unflipped_at",
        "midpoint", "boundary", "quantile", "agreement"}]}``; a switch present in no
        scene has NaN numbers and ``scenes`` 0.
    """
    bits = torch.as_tensor(mode_flips())  # (32, 5)
    gen = torch.Generator().manual_seed(seed)
    proj: list[list[torch.Tensor]] = [[] for _ in SWITCHES]  # per switch: (b, n) projections
    said: list[list[torch.Tensor]] = [[] for _ in SWITCHES]  # per switch: (b, n) decoder flips
    at: list[list[torch.Tensor]] = [[] for _ in SWITCHES]  # per switch: (b, 2) flipped / unflipped
    ratios: list[torch.Tensor] = []
    if hasattr(model, "eval"):
        model.eval()
    with torch.no_grad():
        for x, lab, ign, modes in scene_batches(images, labels, ignore, batch_size, device):
            mu_p, log_sigma_p = model.prior(x)  # (b, N) each
            sigma_p = log_sigma_p.exp()
            u, r = [], []
            for k in range(NUM_MODES):
                mu_q, log_sigma_q = model.posterior_params(x, modes[:, k].to(device), ign.to(device))
                u.append((mu_q - mu_p) / sigma_p)
                r.append((log_sigma_q - log_sigma_p).exp())
            post = torch.stack(u, 1).cpu()  # (b, 32, N) standardised posterior means
            ratios.append(torch.stack(r, 1).mean((1, 2)).cpu())
            eps = torch.randn((x.shape[0], prior_samples, mu_p.shape[1]), generator=gen)  # (b, n, N)
            z = mu_p[:, None] + sigma_p[:, None] * eps.to(device)
            samples = model.decode(x, z).argmax(2).cpu()  # (b, n, H, W)
            counts = switch_counts(samples, lab, ign)
            present = counts.region >= max(1, min_pixels)  # (b, 5)
            flips = counts.hit_twin > counts.hit_original  # (b, n, 5)
            for i in range(len(SWITCHES)):
                keep = present[:, i]
                if not keep.any():
                    continue
                on, off = post[keep][:, bits[:, i]], post[keep][:, ~bits[:, i]]  # (b', 16, N)
                d = on.mean(1) - off.mean(1)
                d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (b', N)
                proj[i].append((eps[keep] * d[:, None]).sum(-1))
                said[i].append(flips[keep][:, :, i])
                at[i].append(torch.stack([(on * d[:, None]).sum(-1).mean(1),
                                          (off * d[:, None]).sum(-1).mean(1)], 1))
    rows = []
    for i, sw in enumerate(SWITCHES):
        quantile = NormalDist().inv_cdf(1.0 - sw.probability)
        row: dict[str, Any] = {"class": sw.name, "probability": sw.probability, "quantile": quantile}
        if not proj[i]:
            rows.append({**row, "scenes": 0, **dict.fromkeys(
                ("sampled", "flipped_at", "unflipped_at", "midpoint", "boundary", "agreement"), math.nan)})
            continue
        p, f, a = torch.cat(proj[i]), torch.cat(said[i]), torch.cat(at[i]).mean(0)
        tau, agreement = best_threshold(p.flatten(), f.flatten())
        rows.append({**row, "scenes": int(p.shape[0]), "sampled": float(f.double().mean()),
                     "flipped_at": float(a[0]), "unflipped_at": float(a[1]),
                     "midpoint": float(a.mean()), "boundary": tau, "agreement": agreement})
    return {"sigma_ratio": float(torch.cat(ratios).mean()) if ratios else math.nan,
            "prior_samples": prior_samples, "per_switch": rows}
