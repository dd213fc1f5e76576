"""The training augmentation, batched on the training device (``TrainConfig.augment_on="device"``).

The same distribution of transforms as the loader path
(:func:`lidcseg.data.transforms.train_transform`: MONAI's ``Rand2DElasticd`` + ``RandSpatialCropd``
per tile in the DataLoader workers), computed for a whole batch with a few torch ops on the
device the batch lives on. MONAI's model, step by step (monai/transforms/spatial/array.py:
``Rand2DElastic``, ``RandDeformGrid``, ``AffineGrid``, ``Resample``):

1. control points every ``elastic_spacing`` px over the ``C x C`` context
   (:func:`lidcseg.data.transforms.tile_context`), centred, with
   ``gh = ceil((C - 1) / (2 s) + 0.5) * 2 + 2`` points per side for even ``C`` (MONAI's
   ``create_control_grid``), each displaced by ``m * N(0, 1)`` px, ``m ~ U[0, elastic_magnitude)``;
2. the points mapped by ``A = R(theta) @ Shear(s01, s10) @ diag(z0, z1)`` (MONAI's own
   ``create_rotate``, ``create_shear``, ``create_scale``), ``theta ~ U[-rotate, rotate)``,
   ``s ~ U[-shear, shear)``, ``z = 1 + U[-scale, scale)``;
3. upsampled by ``elastic_spacing`` with bicubic interpolation (``align_corners=False``) and
   centre-cropped to ``C x C``: the sampling position of every context pixel;
4. the ``T x T`` tile at a corner ``~ U{0..C - T}`` per axis (MONAI's ``RandSpatialCropd``);
5. one resampling of the ``S x S`` crop through those positions: the image bilinear with border
   padding, the masks nearest with zero padding (still exactly 0/1).

Steps 3 and 4 are fused: bicubic upsampling with an integer factor is a separable linear map,
so the positions of the tile's rows and columns are ``W_r @ P @ W_c^T`` with the upsampling
weights ``W`` (taken once from ``torch.nn.functional.interpolate``) of only the needed rows and
columns; only the tile's ``T x T`` pixels are resampled. Resampling is float32 (MONAI: float64).

Parameters are drawn on the CPU from one ``torch.Generator`` per sample, seeded with the
sample's augmentation seed (:meth:`lidcseg.data.dataset.CropTrainDataset.draw`), so a sample
depends only on its seed (not on the batch it is in, nor on the device) and a run is
reproducible. The values differ from the loader path's for the same seed (MONAI draws from
numpy); the distribution is the same (``tests/test_device_augment.py`` checks both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms.utils import create_rotate, create_shear

from lidcseg.data.transforms import AugmentParams, tile_context

#: Keys of a device-mode training sample (:class:`lidcseg.data.dataset.CropTrainDataset`
#: with ``augment_on="device"``): the whole normalised crop, the drawn grader's whole mask
#: and the augmentation seed; :meth:`DeviceAugment.augment_batch` turns them into ``image`` and
#: ``mask``.
CROP_KEYS: tuple[str, str, str] = ("crop", "crop_mask", "aug_seed")


def control_points(context: int, spacing: int) -> int:
    """Control points per side of MONAI's elastic grid over ``context`` px (create_control_grid)."""
    if context % 2 == 0:
        return int(math.ceil((context - 1.0) / (2.0 * spacing) + 0.5) * 2.0 + 2.0)
    return int(math.ceil((context - 1.0) / (2.0 * spacing)) * 2.0 + 3.0)


@dataclass(frozen=True)
class WarpParams:
    """The drawn geometry of a batch: everything :func:`warp_batch` needs besides the pixels.

    Attributes:
        affine: (B, 2, 2) float32, maps (row, col) offsets from the crop centre (MONAI's
            rotation @ shear @ scale, without translation).
        offsets: (B, 2, g, g) float32 control-point displacements in px, (row, col),
            before ``affine`` (MONAI: ``rand_mag * random_offset``).
        corner: (B, 2) int64 top-left (row, col) of the tile in the context, in [0, C - T].
    """

    affine: torch.Tensor
    offsets: torch.Tensor
    corner: torch.Tensor

    def to(self, device: torch.device | str) -> WarpParams:
        """The same parameters on ``device`` (non-blocking copies)."""
        return WarpParams(*(t.to(device, non_blocking=True)
                            for t in (self.affine, self.offsets, self.corner)))


@lru_cache(maxsize=1)
def _monai_affine_basis() -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI's 2-D rotation and shear conventions as tensors, read off its own functions.

    Returns ``(J, K)``: the rotation is ``R(theta) = cos(theta) I + sin(theta) J``; the shear,
    a product of elementary shears (multilinear in its two factors ``a``, ``b``), is
    ``K[0] + a K[1] + b K[2] + a b K[3]``. Probing rather than copying the formulas keeps the
    device path on the loader path's convention in any MONAI version.
    """
    j = torch.as_tensor(np.round(create_rotate(2, math.pi / 2)[:2, :2], 12), dtype=torch.float64)
    s00, s10, s01, s11 = (
        torch.as_tensor(create_shear(2, ab)[:2, :2], dtype=torch.float64)
        for ab in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))
    )
    return j, torch.stack((s00, s10 - s00, s01 - s00, s11 - s10 - s01 + s00))


def affine_matrices(theta: torch.Tensor, shear: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """MONAI's ``create_rotate @ create_shear @ create_scale`` (2-D, no translation), batched.

    Args:
        theta: (B,) rotation angles in radians.
        shear: (B, 2) shear factors (MONAI's ``shear_params``).
        zoom: (B, 2) scale factors of (rows, cols).

    Returns:
        (B, 2, 2) float64 matrices acting on (row, col) offsets from the centre.
    """
    j, k = _monai_affine_basis()
    theta, shear, zoom = (t.to(torch.float64) for t in (theta, shear, zoom))
    eye = torch.eye(2, dtype=torch.float64)
    rot = torch.cos(theta)[:, None, None] * eye + torch.sin(theta)[:, None, None] * j
    a, b = shear[:, 0, None, None], shear[:, 1, None, None]
    shr = k[0] + a * k[1] + b * k[2] + a * b * k[3]
    return rot @ shr @ torch.diag_embed(zoom)


def draw_warp_params(
    seeds: torch.Tensor | list[int], params: AugmentParams, context: int, input_size: int
) -> WarpParams:
    """Draw each sample's rotation, shear, scale, elastic field and tile corner from its seed.

    One ``torch.Generator`` per sample, on the CPU, so ``seeds[i]`` alone fixes sample i:
    eight uniforms (rotation, 2 shears, 2 zooms, elastic magnitude, 2 corner coordinates),
    then the ``2 g g`` standard normal control-point offsets. The distributions are MONAI's
    (``RandAffineGrid._get_rand_param``, ``RandDeformGrid.randomize``, ``get_random_patch``).

    Args:
        seeds: (B,) integer augmentation seeds (taken modulo 2**63).
        params: the magnitudes (same meaning as for the loader path).
        context: C, side of the resampled context (:func:`~lidcseg.data.transforms.tile_context`).
        input_size: T, side of the tile.

    Returns:
        :class:`WarpParams` on the CPU.
    """
    seeds = torch.as_tensor(seeds).reshape(-1).tolist()
    b, g = len(seeds), control_points(context, params.elastic_spacing)
    u = torch.empty(b, 8, dtype=torch.float64)
    normal = torch.empty(b, 2, g, g)
    gen = torch.Generator()
    for i, seed in enumerate(seeds):
        gen.manual_seed(int(seed) % (2**63))
        torch.rand(8, generator=gen, dtype=torch.float64, out=u[i])
        torch.randn(2, g, g, generator=gen, out=normal[i])
    sym = 2.0 * u[:, :5] - 1.0  # U[-1, 1)
    theta = sym[:, 0] * math.radians(params.rotate_deg)
    affine = affine_matrices(theta, sym[:, 1:3] * params.shear, 1.0 + sym[:, 3:5] * params.scale)
    offsets = normal * (u[:, 5] * params.elastic_magnitude).to(torch.float32)[:, None, None, None]
    span = context - input_size + 1  # corners 0 .. C - T, uniform
    corner = (u[:, 6:8] * span).floor().clamp_(max=span - 1).to(torch.int64)
    return WarpParams(affine.to(torch.float32), offsets, corner)


def upsample_weights(points: int, spacing: int) -> torch.Tensor:
    """(points * spacing, points) weights of MONAI's bicubic upsampling of the control grid.

    Column i is the upsampled response to a unit value at control point i
    (``interpolate(..., mode="bicubic", align_corners=False)``, clamped borders included), so
    the upsampled field along one axis is ``W @ values``.
    """
    eye = torch.eye(points, dtype=torch.float64).reshape(points, 1, points, 1)
    up = F.interpolate(eye, scale_factor=(float(spacing), 1.0), mode="bicubic",
                       align_corners=False, recompute_scale_factor=True)
    return up[:, 0, :, 0].T.contiguous()


def warp_batch(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    warp: WarpParams,
    spacing: int,
    context: int,
    input_size: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample a batch through its drawn geometry (deterministic; steps 1-5 of the module docs).

    Args:
        image: (B, C, S, S) float images (normalised), on any device.
        mask: (B, K, S, S) 0/1 masks (any dtype), or None.
        warp: the batch's parameters (moved to ``image.device`` here).
        spacing: control-point spacing in px (``AugmentParams.elastic_spacing``).
        context: C <= S, side of the context the control grid covers.
        input_size: T <= C, side of the tile.
        weights: :func:`upsample_weights` for the grid (computed if None).

    Returns:
        ``(image (B, C, T, T) float32, mask (B, K, T, T) float32 0/1 or None)``.
    """
    s_h, s_w = image.shape[-2:]
    dev = image.device
    warp = warp.to(dev)
    g = warp.offsets.shape[-1]
    if weights is None:
        weights = upsample_weights(g, spacing)
    weights = weights.to(dev, torch.float32)  # (g * spacing, g)
    # Control points, centred, `spacing` px apart; displaced, then mapped by the affine.
    half = (g - 1) / 2.0 * spacing
    axis = torch.linspace(-half, half, g, device=dev)
    base = torch.stack(torch.meshgrid(axis, axis, indexing="ij"))  # (2, g, g)
    pts = torch.einsum("bij,bjhw->bihw", warp.affine, base + warp.offsets)  # (B, 2, g, g): row, col
    # grid_sample wants (x, y) = (col, row) in [-1, 1] (align_corners=False: 2 / size per px).
    norm = torch.tensor([2.0 / max(2, s_w), 2.0 / max(2, s_h)], device=dev)
    pts = pts.flip(1) * norm[:, None, None]  # (B, 2, g, g): (x, y), normalised
    # Rows/cols of the upsampled field: MONAI's centre crop of C, then the tile at `corner`.
    start = weights.shape[0] // 2 - context // 2
    idx = start + warp.corner[:, :, None] + torch.arange(input_size, device=dev)  # (B, 2, T)
    w_r, w_c = weights[idx[:, 0]], weights[idx[:, 1]]  # (B, T, g) each
    grid = (w_r[:, None] @ pts @ w_c[:, None].transpose(-1, -2))  # (B, 2, T, T)
    grid = grid.permute(0, 2, 3, 1)  # (B, T, T, 2)
    out = F.grid_sample(image.to(torch.float32), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    if mask is None:
        return out, None
    msk = F.grid_sample(mask.to(torch.float32), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)
    return out, msk


class DeviceAugment:
    """The batched training augmentation (same distribution as the loader path), on any device.

    Example (the training loop, ``augment_on="device"``)::

        aug = DeviceAugment(train_ds.augment_params, train_ds.input_size)
        batch = aug.augment_batch(batch, device)  # crop, crop_mask, aug_seed -> image, mask

    Args:
        params: the magnitudes (:class:`~lidcseg.data.transforms.AugmentParams`).
        input_size: T, side of the output tile (paper: 128).
    """

    def __init__(self, params: AugmentParams | None, input_size: int) -> None:
        self.params = params or AugmentParams()
        self.input_size = int(input_size)
        self._weights: dict[tuple[int, str], torch.Tensor] = {}

    def draw(self, seeds: torch.Tensor | list[int], crop_size: int) -> WarpParams:
        """The batch's parameters, drawn on the CPU from the per-sample seeds."""
        context = tile_context(self.input_size, crop_size, self.params)
        return draw_warp_params(seeds, self.params, context, self.input_size)

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, seeds: torch.Tensor | list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch of whole crops on ``image.device``.

        Args:
            image: (B, C, S, S) float normalised crops (C = 1 for LIDC).
            mask: (B, S, S) or (B, K, S, S) 0/1 masks, any dtype, any device.
            seeds: (B,) integer augmentation seeds, one per sample (CPU tensor or list).

        Returns:
            ``(image (B, C, T, T) float32, mask (B, T, T) or (B, K, T, T) int64 0/1)`` on
            ``image.device``, T = ``input_size``.
        """
        if image.ndim != 4 or image.shape[-1] != image.shape[-2]:
            raise ValueError(f"image must be (B, C, S, S), got {tuple(image.shape)}")
        b, s = image.shape[0], image.shape[-1]
        if mask.shape[0] != b or mask.shape[-2:] != image.shape[-2:] or mask.ndim not in (3, 4):
            raise ValueError(f"mask {tuple(mask.shape)} does not match image {tuple(image.shape)}")
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for a batch of {b}")
        context = tile_context(self.input_size, s, self.params)
        warp = self.draw(seeds, s)
        g = warp.offsets.shape[-1]
        key = (g, str(image.device))
        if key not in self._weights:
            weights = upsample_weights(g, self.params.elastic_spacing)
            self._weights[key] = weights.to(image.device, torch.float32)
        m4 = mask.to(image.device, non_blocking=True)
        m4 = m4[:, None] if m4.ndim == 3 else m4
        img, msk = warp_batch(image, m4, warp, self.params.elastic_spacing, context,
                              self.input_size, self._weights[key])
        labels = (cast(torch.Tensor, msk) > 0.5).to(torch.int64)
        return img, labels[:, 0] if mask.ndim == 3 else labels

    def augment_batch(self, batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
        """A device-mode DataLoader batch -> the loader path's keys, on ``device``.

        ``crop`` (B, 1, S, S), ``crop_mask`` (B, S, S) and ``aug_seed`` (B,) become ``image``
        (B, 1, T, T) float32 and ``mask`` (B, T, T) int64 on ``device``; other keys pass through.
        """
        image = batch["crop"].to(device, non_blocking=True)
        mask = batch["crop_mask"].to(device, non_blocking=True)
        img, msk = self(image, mask, batch["aug_seed"])
        out = {k: v for k, v in batch.items() if k not in CROP_KEYS}
        out["image"], out["mask"] = img, msk
        return out
