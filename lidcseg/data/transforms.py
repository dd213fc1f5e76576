"""Intensity normalisation and MONAI augmentation of crops (the paper's Appendix H.1).

The paper trains on 128 x 128 tiles cut from the 180 x 180 lesion-centred
crops with "random elastic deformation, rotation, shearing, scaling and a
randomly translated crop". It gives no magnitudes; ours are the defaults of
:class:`AugmentParams` (chosen mild, so that small nodules keep their shape).

Every geometric augmentation is ONE resampling: MONAI's ``Rand2DElasticd``
composes the elastic field with the random affine (rotation, shear, scale)
and samples image and masks through the same grid, the image bilinearly, the
masks with nearest neighbour (label maps are never blended, so masks stay
exactly 0/1). A ``RandSpatialCropd`` then cuts the randomly translated
``input_size`` tile. The random state of the whole chain is set from one
integer seed per sample (:func:`apply_transform`), so any sample can be
reproduced from its seed alone, whatever the DataLoader worker count.

This chain runs per tile in the DataLoader workers (``TrainConfig.augment_on =
"loader"``). :mod:`lidcseg.data.device_augment` computes the same distribution of
transforms batched on the training device (``augment_on = "device"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import CenterSpatialCropd, Compose, Rand2DElasticd, RandSpatialCropd

#: The HU window mapped onto [-1, 1]: air (-1024) to soft tissue/bone onset (+400).
#: Everything below -1024 (padding, outside-of-scan) becomes -1, everything
#: above +400 (bone, calcification, contrast) saturates at +1. Lung parenchyma
#: (about -850) maps to about -0.76, nodules (about -100..+100) to about 0.3..0.58.
HU_WINDOW: tuple[float, float] = (-1024.0, 400.0)


def normalize_hu(image: np.ndarray | torch.Tensor, window: tuple[float, float] = HU_WINDOW) -> torch.Tensor:
    """Window CT intensities and scale them linearly to [-1, 1].

    ``out = clip((hu - c) / w, -1, 1)`` with ``c = (lo + hi) / 2`` and
    ``w = (hi - lo) / 2``; for the default window ``c = -312``, ``w = 712``.

    Args:
        image: (..., H, W) Hounsfield units, any integer or float dtype.
        window: (lo, hi) HU mapped to -1 and +1.

    Returns:
        float32 tensor of the same shape, values in [-1, 1].
    """
    lo, hi = window
    if not hi > lo:
        raise ValueError(f"bad HU window {window}")
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    x = x.to(torch.float32)
    centre, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    return ((x - centre) / half).clamp_(-1.0, 1.0)


@dataclass(frozen=True)
class AugmentParams:
    """Magnitudes of the random training augmentation (paper: elastic, rotation, shear, scale, shift).

    Attributes:
        rotate_deg: rotation drawn uniformly from [-rotate_deg, rotate_deg] degrees.
        shear: shear factors drawn uniformly from [-shear, shear] (both axes).
        scale: zoom factor 1 + u, u uniform in [-scale, scale] (both axes independently).
        elastic_spacing: pixels between the control points of the elastic field (24 px = 12 mm).
        elastic_magnitude: upper bound of MONAI's offset magnitude, drawn uniformly in [0, m];
            m = 2 displaces pixels by about 1-2 px on average (measured).
        max_shift: largest translation of the ``input_size`` tile from the crop centre, pixels.
            The paper's 128 tile out of a 180 crop allows (180 - 128) / 2 = 26.
    """

    rotate_deg: float = 15.0
    shear: float = 0.1
    scale: float = 0.1
    elastic_spacing: int = 24
    elastic_magnitude: float = 2.0
    max_shift: int = 26


def tile_context(input_size: int, crop_size: int, params: AugmentParams) -> int:
    """Side of the resampled centre region the tile is cut from: ``min(S, T + 2 * max_shift)``.

    Both augmentation paths (this module's MONAI chain and
    :mod:`lidcseg.data.device_augment`) build their elastic control grid over it.

    Raises:
        ValueError: ``input_size`` exceeds ``crop_size``.
    """
    if input_size > crop_size:
        raise ValueError(f"input_size {input_size} exceeds crop_size {crop_size}")
    return min(crop_size, input_size + 2 * max(0, params.max_shift))


def train_transform(input_size: int, crop_size: int, params: AugmentParams | None = None) -> Compose:
    """The random training augmentation for samples ``{"image", "mask"}``.

    Input ``image`` (1, S, S) float (already normalised, see :func:`normalize_hu`)
    and ``mask`` (K, S, S) float 0/1; output (1, T, T) and (K, T, T) with
    ``T = input_size``. The elastic + affine resampling writes only the
    ``T + 2 * max_shift`` centre (capped at ``S``), from which the tile is cut
    at a uniformly random offset.

    Args:
        input_size: T, the side of the output tile (paper: 128).
        crop_size: S, the side of the stored crop (paper: 180).
        params: augmentation magnitudes; defaults to :class:`AugmentParams`.
    """
    p = params or AugmentParams()
    context = tile_context(input_size, crop_size, p)
    keys = ("image", "mask")
    return Compose(
        [
            Rand2DElasticd(
                keys=keys,
                spacing=(p.elastic_spacing, p.elastic_spacing),
                magnitude_range=(0.0, p.elastic_magnitude),
                prob=1.0,
                rotate_range=(math.radians(p.rotate_deg),),
                shear_range=(p.shear, p.shear),
                scale_range=(p.scale, p.scale),
                spatial_size=(context, context),
                mode=("bilinear", "nearest"),
                padding_mode=("border", "zeros"),
            ),
            RandSpatialCropd(keys=keys, roi_size=(input_size, input_size), random_size=False),
        ]
    )


def eval_transform(input_size: int) -> Compose:
    """Validation/test: the centre ``input_size`` tile, no randomness.

    Maps ``image`` (1, S, S) and ``mask`` (K, S, S) to (1, T, T) and (K, T, T).
    """
    return Compose([CenterSpatialCropd(keys=("image", "mask"), roi_size=(input_size, input_size))])


def apply_transform(
    transform: Compose, image: torch.Tensor, mask: torch.Tensor, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``transform`` on one sample, with its random state set from ``seed``.

    Args:
        transform: from :func:`train_transform` or :func:`eval_transform`.
        image: (1, S, S) float32 normalised image.
        mask: (K, S, S) masks, any dtype with values 0/1.
        seed: the sample's augmentation seed (0 <= seed < 2**32); the same seed
            gives the same output. ``None`` keeps the transform's current state.

    Returns:
        ``(image (1, T, T) float32, mask (K, T, T) uint8)``, plain tensors.
    """
    if seed is not None:
        transform.set_random_state(seed=int(seed) % (2**32))
    out: Mapping[str, Any] = transform({"image": image, "mask": mask.to(torch.float32)})
    img = _plain(out["image"]).to(torch.float32).contiguous()
    msk = (_plain(out["mask"]) > 0.5).to(torch.uint8).contiguous()
    return img, msk


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor from MONAI's MetaTensor (or numpy)."""
    if hasattr(x, "as_tensor"):
        return x.as_tensor()
    return torch.as_tensor(x)
