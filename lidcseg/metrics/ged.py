"""Distances between a set of samples and a set of grader masks.

- Generalized energy distance (Kohl et al. 2018, Eq. 6) with d = 1 - IoU:

      D^2_GED(P_gt, P_out) = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]

  estimated from n samples S and m grader masks Y of one image.
- Sample diversity E[d(S, S')].
- Hungarian-matched IoU: the mean IoU of an optimal one-to-one matching of
  samples to graders, both sets replicated to lcm(n, m) (as CCDM does).

Every function is pure and batched over images; :class:`DistributionMetric`
accumulates per-image values over batches (MONAI style).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lidcseg.metrics.overlap import EMPTY_IOU, pairwise_distance, pairwise_iou


class GEDTerms(NamedTuple):
    """The three expectations of Eq. 6 and their combination, each (B,).

    Attributes:
        ged: 2 * cross - samples - graders.
        cross: E[d(S, Y)] over all n * m pairs.
        samples: E[d(S, S')], the sample diversity.
        graders: E[d(Y, Y')], the graders' diversity.
    """

    ged: torch.Tensor
    cross: torch.Tensor
    samples: torch.Tensor
    graders: torch.Tensor


def _self_mean(d: torch.Tensor, unbiased: bool, what: str) -> torch.Tensor:
    """Mean of (B, k, k) self-distances: all k^2 entries, or the k(k-1) off-diagonal ones."""
    if not unbiased:
        return d.mean(dim=(1, 2))
    k = d.shape[1]
    if k < 2:
        raise ValueError(f"unbiased GED needs at least 2 {what}, got {k}")
    off_diagonal = d.sum(dim=(1, 2)) - d.diagonal(dim1=1, dim2=2).sum(1)
    return off_diagonal / (k * (k - 1))


def ged_terms(
    samples: torch.Tensor,
    graders: torch.Tensor,
    unbiased: bool = False,
    empty_value: float = EMPTY_IOU,
) -> GEDTerms:
    """The terms of the generalized energy distance (Eq. 6) for each image.

    Args:
        samples: (B, n, H, W) bool sample masks.
        graders: (B, m, H, W) bool grader masks.
        unbiased: False (default): V-statistic, every mean over the full n x n
            and m x m matrices, diagonal (d = 0) included - what every published
            implementation computes; its expectation exceeds the true GED by
            E[d(S,S')]/n + E[d(Y,Y')]/m. True: U-statistic, the self terms
            average the off-diagonal pairs only (needs n, m >= 2); unbiased,
            so it can be negative for one image.
        empty_value: IoU of two empty masks (Appendix B: 1, so d = 0).

    Returns:
        :class:`GEDTerms` of (B,) float32 tensors.
    """
    cross = pairwise_distance(samples, graders, empty_value).mean(dim=(1, 2))
    ss = _self_mean(pairwise_distance(samples, samples, empty_value), unbiased, "samples")
    yy = _self_mean(pairwise_distance(graders, graders, empty_value), unbiased, "graders")
    return GEDTerms(2.0 * cross - ss - yy, cross, ss, yy)


def generalized_energy_distance(
    samples: torch.Tensor,
    graders: torch.Tensor,
    unbiased: bool = False,
    empty_value: float = EMPTY_IOU,
) -> torch.Tensor:
    """D^2_GED = 2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')] (Eq. 6), d = 1 - IoU, per image.

    Args:
        samples: (B, n, H, W) bool.
        graders: (B, m, H, W) bool.
        unbiased: V-statistic (False, default, the published convention) or
            U-statistic (True); see :func:`ged_terms`.
        empty_value: IoU of two empty masks.

    Returns:
        (B,) float32. The V-statistic is >= 0 (the Jaccard index is a positive-definite
        kernel, so d = 1 - IoU is of negative type).
    """
    return ged_terms(samples, graders, unbiased, empty_value).ged


def sample_diversity(
    samples: torch.Tensor, unbiased: bool = False, empty_value: float = EMPTY_IOU
) -> torch.Tensor:
    """E[d(S, S')] for each image: (B, n, H, W) -> (B,).

    ``unbiased=False`` averages all n^2 pairs (the GED term), ``True`` the
    n(n-1) distinct ones.
    """
    return _self_mean(pairwise_distance(samples, samples, empty_value), unbiased, "samples")


def hungarian_iou(
    samples: torch.Tensor, graders: torch.Tensor, empty_value: float = EMPTY_IOU
) -> torch.Tensor:
    """Hungarian-matched IoU per image.

    Both sets are replicated to L = lcm(n, m) members (each sample L/n times,
    each grader L/m times); ``scipy.optimize.linear_sum_assignment`` finds the
    one-to-one matching of minimal total cost 1 - IoU, and the result is the
    mean IoU over the L matched pairs.

    Args:
        samples: (B, n, H, W) bool.
        graders: (B, m, H, W) bool.
        empty_value: IoU of two empty masks.

    Returns:
        (B,) float32 on the device of ``samples``.
    """
    out = hungarian_iou_from_matrix(pairwise_iou(samples, graders, empty_value))  # (B,)
    return torch.as_tensor(out, dtype=torch.float32, device=samples.device)


def hungarian_iou_from_matrix(ious: torch.Tensor | np.ndarray) -> np.ndarray:
    """Hungarian-matched IoU from an IoU matrix per image (see :func:`~lidcseg.metrics.hungarian_iou`).

    Both sets are replicated to L = lcm(n, m) members; ``linear_sum_assignment``
    minimises the total cost 1 - IoU; the result is the mean IoU over the L
    matched pairs.

    Args:
        ious: (B, n, m) IoU of samples (rows) against graders (columns).

    Returns:
        (B,) float64.
    """
    if isinstance(ious, torch.Tensor):
        ious = ious.detach().double().cpu().numpy()
    n, m = ious.shape[1:]
    size = math.lcm(n, m)
    rows, cols = np.arange(size) % n, np.arange(size) % m
    out = np.empty(ious.shape[0])
    for i, matrix in enumerate(ious):
        replicated = matrix[np.ix_(rows, cols)]  # (L, L)
        r, c = linear_sum_assignment(1.0 - replicated)
        out[i] = replicated[r, c].mean()
    return out


class DistributionMetric:
    """Accumulates GED terms and Hungarian IoU per image over batches.

    Example::

        metric = DistributionMetric()
        for samples, graders in batches:   # (B, n, H, W), (B, m, H, W) bool
            metric(samples, graders)
        summary = metric.aggregate()       # {"ged": 0.25, ...} means over images
        per_image = metric.per_image()     # {"ged": (N_images,) tensor, ...}

    Args:
        unbiased: V- (False) or U-statistic (True) GED; see :func:`ged_terms`.
        empty_value: IoU of two empty masks.
        hungarian: also compute the Hungarian-matched IoU (CPU, scipy).
    """

    def __init__(
        self, unbiased: bool = False, empty_value: float = EMPTY_IOU, hungarian: bool = True
    ) -> None:
        self.unbiased = unbiased
        self.empty_value = empty_value
        self.hungarian = hungarian
        self._values: dict[str, list[torch.Tensor]] = {}

    def __call__(self, samples: torch.Tensor, graders: torch.Tensor) -> dict[str, torch.Tensor]:
        """Add one batch; returns its per-image values, each (B,)."""
        terms = ged_terms(samples, graders, self.unbiased, self.empty_value)
        batch = {
            "ged": terms.ged,
            "cross_distance": terms.cross,
            "sample_diversity": terms.samples,
            "grader_diversity": terms.graders,
        }
        if self.hungarian:
            batch["hungarian_iou"] = hungarian_iou(samples, graders, self.empty_value)
        for key, value in batch.items():
            self._values.setdefault(key, []).append(value.detach().cpu())
        return batch

    def per_image(self) -> dict[str, torch.Tensor]:
        """Every image's values so far, each (N_images,)."""
        return {key: torch.cat(values) for key, values in self._values.items()}

    def aggregate(self) -> dict[str, float]:
        """Means over all images so far."""
        return {key: float(v.mean()) for key, v in self.per_image().items()}

    def reset(self) -> None:
        """Forget every accumulated value."""
        self._values.clear()
