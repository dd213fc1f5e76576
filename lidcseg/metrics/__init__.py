"""Metrics on sets of segmentations: IoU, GED (Eq. 6), sample diversity, Hungarian IoU.

Pure functions on (B, n, H, W) bool tensors, with :class:`DistributionMetric`
to accumulate per-image values over batches.
"""

from lidcseg.metrics.ged import (
    DistributionMetric,
    GEDTerms,
    ged_terms,
    generalized_energy_distance,
    hungarian_iou,
    sample_diversity,
)
from lidcseg.metrics.overlap import EMPTY_IOU, iou, pairwise_distance, pairwise_iou

__all__ = [
    "EMPTY_IOU",
    "DistributionMetric",
    "GEDTerms",
    "ged_terms",
    "generalized_energy_distance",
    "hungarian_iou",
    "iou",
    "pairwise_distance",
    "pairwise_iou",
    "sample_diversity",
]
