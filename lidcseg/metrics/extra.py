"""Every metric of an evaluation at several sample counts from ONE pairwise IoU matrix.

An evaluation at n = 1, 4, 8, 16 samples (the paper's Fig. 4) draws 16 samples
per image once and scores the first n of them. All three GED terms (Eq. 6),
the sample diversity and the Hungarian-matched IoU are functions of the IoU
matrix of the n + m masks of an image (n samples S, m grader masks Y), and the
matrix of the first n samples is the top-left block of the 16-sample one. So
:func:`joint_iou` runs one batched matrix product per batch of images and
:func:`prefix_metrics` reads every sample count off its blocks; the results
equal :func:`lidcseg.metrics.ged_terms`, :func:`~lidcseg.metrics.sample_diversity`
and :func:`~lidcseg.metrics.hungarian_iou` on the sliced masks (tested).

Pure, batched functions; any device (the Hungarian matching runs on the CPU
with scipy; its input is only (B, n, m) numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lidcseg.metrics.ged import _self_mean, hungarian_iou_from_matrix
from lidcseg.metrics.overlap import EMPTY_IOU

#: Per-image values :func:`prefix_metrics` returns for each sample count.
METRIC_NAMES: tuple[str, ...] = ("ged", "diversity", "hm_iou", "cross", "grader_diversity")


def joint_iou(
    samples: torch.Tensor, graders: torch.Tensor, empty_value: float = EMPTY_IOU
) -> torch.Tensor:
    """IoU of every pair among the n samples and m grader masks of each image.

    Args:
        samples: (B, n, H, W) bool.
        graders: (B, m, H, W) bool, on the device of ``samples``.
        empty_value: IoU of two empty masks (Appendix B: 1).

    Returns:
        (B, n + m, n + m) float32: rows/columns 0..n-1 are the samples, n.. the graders.
        Equal to ``pairwise_iou(both, both)`` of the concatenated masks, but the
        masks are converted to float once and the areas are the Gram matrix's
        diagonal (half the work of :func:`~lidcseg.metrics.pairwise_iou` here).
    """
    if samples.shape[0] != graders.shape[0] or samples.shape[2:] != graders.shape[2:]:
        raise ValueError(
            f"samples {tuple(samples.shape)} and graders {tuple(graders.shape)} must share B and H, W"
        )
    both = torch.cat([samples, graders.to(samples.device)], dim=1)  # (B, n + m, H, W)
    flat = both.flatten(2).to(torch.float32)  # (B, K, P), exact counts up to 2^24 pixels
    inter = torch.matmul(flat, flat.transpose(1, 2))  # (B, K, K)
    area = inter.diagonal(dim1=1, dim2=2)  # (B, K): |A ∩ A| = |A|
    union = area[:, :, None] + area[:, None, :] - inter
    iou = inter / union.clamp_min(1.0)
    return torch.where(union > 0, iou, torch.full_like(iou, empty_value))


def prefix_metrics(
    ious: torch.Tensor,
    n_samples: int,
    counts: Sequence[int],
    unbiased: bool = False,
    hungarian: bool = True,
) -> dict[int, dict[str, np.ndarray]]:
    """Per-image metrics of the first k samples, for every k in ``counts``.

    With d = 1 - IoU, for the first k samples S and all m graders Y:

    - ``ged``: D^2_GED = 2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')] (Eq. 6), V-statistic
      (all k x k and m x m pairs, diagonal included; the published convention)
      or, with ``unbiased``, the U-statistic (distinct pairs; needs k, m >= 2);
    - ``diversity``: E[d(S,S')], the same statistic as GED's sample term;
    - ``hm_iou``: Hungarian-matched IoU (:func:`hungarian_iou_from_matrix`);
    - ``cross``: E[d(S,Y)]; ``grader_diversity``: E[d(Y,Y')].

    Args:
        ious: (B, n + m, n + m) from :func:`joint_iou` (samples first).
        n_samples: n, the samples in ``ious``.
        counts: sample counts k, each 1 <= k <= n.
        unbiased: U- instead of V-statistic for the self terms.
        hungarian: compute ``hm_iou`` (scipy, CPU); NaN if False.

    Returns:
        ``{k: {name: (B,) float64 array}}`` for the names of :data:`METRIC_NAMES`.
    """
    n = n_samples
    if ious.ndim != 3 or ious.shape[1] != ious.shape[2] or ious.shape[1] <= n:
        raise ValueError(f"ious must be (B, n + m, n + m) with n = {n} and m >= 1, got {tuple(ious.shape)}")
    for k in counts:
        if not 1 <= k <= n:
            raise ValueError(f"sample count {k} not in [1, {n}]")
    d = 1.0 - ious.double()
    yy = _self_mean(d[:, n:, n:], unbiased, "graders")  # (B,)
    out: dict[int, dict[str, np.ndarray]] = {}
    for k in counts:
        cross = d[:, :k, n:].mean(dim=(1, 2))
        ss = _self_mean(d[:, :k, :k], unbiased, "samples")
        hm = (
            hungarian_iou_from_matrix(ious[:, :k, n:])
            if hungarian
            else np.full(ious.shape[0], np.nan)
        )
        out[k] = {
            "ged": (2.0 * cross - ss - yy).cpu().numpy(),
            "diversity": ss.cpu().numpy(),
            "hm_iou": hm,
            "cross": cross.cpu().numpy(),
            "grader_diversity": yy.cpu().numpy(),
        }
    return out
