"""Intersection over union and the distance d = 1 - IoU (Kohl et al. 2018, Appendix B).

Masks are boolean foreground maps. The IoU of two empty masks is undefined;
the paper (Appendix B) sets it to 1, so d(empty, empty) = 0, while one empty and
one non-empty mask have IoU 0 and d = 1. The value is the named argument
``empty_value`` of every function here.

All functions are pure, batched and work on any device; they count pixels in
float32 (exact up to 2^24 pixels per mask).
"""

from __future__ import annotations

import torch

#: IoU of two empty masks (Appendix B): 1, so that their distance is 0.
EMPTY_IOU = 1.0


def _flat(masks: torch.Tensor, name: str) -> torch.Tensor:
    if masks.ndim < 3:
        raise ValueError(f"{name} must be (B, n, *spatial), got shape {tuple(masks.shape)}")
    return masks.flatten(2).to(torch.float32)  # (B, n, P)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor, empty_value: float = EMPTY_IOU) -> torch.Tensor:
    """IoU of every mask of ``a`` with every mask of ``b``, per image.

    Intersections are one batched matrix product of the flattened masks.

    Args:
        a: (B, n, H, W) bool masks (any number of trailing spatial dims).
        b: (B, m, H, W) bool masks, same spatial shape.
        empty_value: IoU of two empty masks (paper: 1).

    Returns:
        (B, n, m) float32 IoU in [0, 1].
    """
    fa, fb = _flat(a, "a"), _flat(b, "b")
    if fa.shape[0] != fb.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(
            f"a {tuple(a.shape)} and b {tuple(b.shape)} must share B and the spatial shape"
        )
    inter = torch.matmul(fa, fb.transpose(1, 2))  # (B, n, m)
    union = fa.sum(2)[:, :, None] + fb.sum(2)[:, None, :] - inter
    iou = inter / union.clamp_min(1.0)
    return torch.where(union > 0, iou, torch.full_like(iou, empty_value))


def pairwise_distance(
    a: torch.Tensor, b: torch.Tensor, empty_value: float = EMPTY_IOU
) -> torch.Tensor:
    """d = 1 - IoU for every pair: (B, n, H, W), (B, m, H, W) -> (B, n, m)."""
    return 1.0 - pairwise_iou(a, b, empty_value)


def iou(a: torch.Tensor, b: torch.Tensor, empty_value: float = EMPTY_IOU) -> torch.Tensor:
    """IoU of corresponding masks: (..., H, W) and (..., H, W) -> (...)."""
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"a {tuple(a.shape)} and b {tuple(b.shape)} must have one (..., H, W) shape"
        )
    fa, fb = a.flatten(-2).to(torch.float32), b.flatten(-2).to(torch.float32)
    inter = (fa * fb).sum(-1)
    union = fa.sum(-1) + fb.sum(-1) - inter
    out = inter / union.clamp_min(1.0)
    return torch.where(union > 0, out, torch.full_like(out, empty_value))
