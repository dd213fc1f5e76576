"""The flip task's training augmentation (Appendix H.2), drawn per sample and applied through MONAI.

The paper trains on Cityscapes with "elastic deformation, rotation, shearing,
scaling, random translation and colour augmentation" and gives no magnitudes.
Ours are the defaults of :class:`SceneAugmentParams`; where the authors' public
code (``training/prob_unet_config.py``, ``data/cityscapes/data_loader.py`` of
SimonKohl/probabilistic_unet) sets a value, we take it:

==================  ===========================================  =============================
augmentation        ours (at 256 x 512)                          authors' code
==================  ===========================================  =============================
elastic             control points every 64 px, offsets          alpha U(0, 800), sigma
                    N(0, m^2), m ~ U(0, 5) px (std <= 4.4 px)    U(25, 35) (std 3-5 px)
rotation            U(-22.5, 22.5) degrees                       U(-pi/8, pi/8)
scale               one factor U(0.8, 1.2) for both axes         (0.8, 1.2), isotropic
shear               U(-0.1, 0.1) per axis (our LIDC value)       none
translation         U(-1/16, 1/16) of each side                  none (crop = image)
colour              per-channel gamma U(0.7, 1) or U(1, 1.5)     the same (p = 0.3,
                    with p = 0.3, channel mean/std kept          retain_stats, per channel)
padding             image black, label ignore (255)              the same (constant 0 / 255)
mirroring           off (``paper+mirror``: p = 1/2)              ``MirrorTransform``, p = 1/2
==================  ===========================================  =============================

Lengths are pixels at 256 rows and scale with the scene's height (the 32 x 64
synthetic scenes get 8 px control spacing and m up to 0.6 px), so one setting
means the same deformation at every resolution. The image is clipped back to
[-1, 1] after the gamma. Unlike the authors' loader, validation scenes get no
gamma (theirs applies it to validation batches too).

**Draw, then apply** (TorchIO's rule, ``STYLE.md``): :func:`draw_augmentation`
turns a seeded generator into a :class:`SceneAugmentation` (every number of the
augmentation, loggable); :func:`augment_scene` applies it deterministically.
The geometry is ONE resampling, composed as MONAI's ``Rand2DElastic`` does:
MONAI's control grid (``create_control_grid``) plus the drawn offsets, mapped by
the affine ``rotate @ shear @ translate @ scale`` (MONAI's ``create_*``), upsampled
bicubically to a dense grid, through which the image is sampled bilinearly and
the label with nearest neighbour, as MONAI's ``Resample`` does (:func:`resample`;
labels are never blended, so they stay in {0..23, 255}). Pixels the grid brings
in from outside the scene are the ignore label, never class 0. The colour is
MONAI's ``AdjustContrast`` per channel (:func:`colour_gamma`). Both are tested
equal to MONAI's transforms and skip its metadata bookkeeping, which costs more
than the work itself on small scenes.

**Flips and warp.** The dataset flips the label BEFORE the warp. Flipping is a
per-pixel relabelling that fixes 255, so with nearest-neighbour sampling
``warp(flip(label)) == flip(warp(label))`` exactly: the flipped classes cover
exactly the warped regions of their originals (the authors flip after the warp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from monai.transforms.utils import (
    create_control_grid,
    create_rotate,
    create_scale,
    create_shear,
    create_translate,
)

from lidcseg.flips import IGNORE_INDEX

#: Sub-stream of ``SeedSequence([seed, AUGMENT_STREAM, k])`` that draws sample k's augmentation
#: (0: epoch order, 1: mirroring, 2: flips, see :data:`lidcseg.flips.FLIP_STREAM`).
AUGMENT_STREAM = 3


@dataclass(frozen=True)
class SceneAugmentParams:
    """Magnitudes of the flip task's augmentation (Appendix H.2; the paper gives none).

    Lengths are pixels at ``reference_height`` rows, scaled by ``height / reference_height``.

    Attributes:
        rotate_deg: rotation U(-rotate_deg, rotate_deg) degrees (authors' code: pi/8).
        shear: shear factors U(-shear, shear), each axis (authors' code: none).
        scale: one zoom factor U(1 - scale, 1 + scale) for both axes (authors' code: 0.2).
        max_shift: translation U(-max_shift, max_shift) of each side's length.
        elastic_spacing: pixels between the elastic field's control points.
        elastic_magnitude: the offsets at the control points are N(0, m^2) pixels,
            m ~ U(0, elastic_magnitude) per sample (MONAI's ``RandDeformGrid``).
        gamma_range: per-channel gamma, U(lo, 1) or U(1, hi) with probability 1/2 each.
        gamma_prob: probability that a sample gets the colour (gamma) augmentation.
        reference_height: the height the lengths above are given at (paper: 256).
    """

    rotate_deg: float = 22.5
    shear: float = 0.1
    scale: float = 0.2
    max_shift: float = 1 / 16
    elastic_spacing: float = 64.0
    elastic_magnitude: float = 5.0
    gamma_range: tuple[float, float] = (0.7, 1.5)
    gamma_prob: float = 0.3
    reference_height: int = 256


@dataclass(frozen=True)
class SceneAugmentation:
    """Every number of one sample's augmentation (applied by :func:`augment_scene`).

    Attributes:
        mirror: mirror left-right first.
        rotate: rotation, radians.
        shear: (2,) MONAI shear factors.
        scale: zoom factor of both axes (> 1 shows more of the scene, smaller).
        shift: (rows, cols) translation, pixels.
        spacing: pixels between the elastic control points.
        offsets: (2, gh, gw) float32 offsets of the control points in pixels, or
            ``None``: no geometric warp at all (mirroring and colour only).
        gammas: (3,) per-channel gamma, or ``None``: no colour augmentation.
    """

    mirror: bool = False
    rotate: float = 0.0
    shear: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    spacing: int = 8
    offsets: np.ndarray | None = None
    gammas: tuple[float, float, float] | None = None


def control_shape(height: int, width: int, spacing: int) -> tuple[int, int]:
    """(gh, gw): the shape of MONAI's control grid over an (height, width) image."""
    gh, gw = _control_grid(height, width, spacing).shape[1:]
    return int(gh), int(gw)


def draw_augmentation(
    rng: np.random.Generator, height: int, width: int, params: SceneAugmentParams | None = None,
    *, mirror: bool = False,
) -> SceneAugmentation:
    """Draw one sample's augmentation (a fixed number of draws from ``rng``, in a fixed order).

    Args:
        rng: the sample's generator, e.g. ``default_rng([seed, AUGMENT_STREAM, k])``.
        height, width: the scene's size H, W.
        params: magnitudes; default :class:`SceneAugmentParams`.
        mirror: the (separately drawn) mirroring decision, recorded as is.
    """
    p = params or SceneAugmentParams()
    px = height / p.reference_height
    spacing = max(2, round(p.elastic_spacing * px))
    rotate = math.radians(rng.uniform(-p.rotate_deg, p.rotate_deg))
    shear = tuple(float(s) for s in rng.uniform(-p.shear, p.shear, size=2))
    scale = float(1.0 + rng.uniform(-p.scale, p.scale))
    shift = tuple(float(u * p.max_shift * n) for u, n in zip(rng.uniform(-1, 1, size=2), (height, width), strict=True))
    magnitude = rng.uniform(0.0, p.elastic_magnitude * px)
    offsets = (magnitude * rng.standard_normal((2, *control_shape(height, width, spacing)))).astype(np.float32)
    colour = rng.random() < p.gamma_prob
    lo, hi = p.gamma_range
    below, low, high = rng.random(3) < 0.5, rng.uniform(lo, 1.0, 3), rng.uniform(max(lo, 1.0), hi, 3)
    gammas = tuple(float(g) for g in np.where(below & (lo < 1.0), low, high)) if colour else None
    return SceneAugmentation(mirror=bool(mirror), rotate=float(rotate), shear=shear, scale=scale,  # type: ignore[arg-type]
                             shift=shift, spacing=int(spacing), offsets=offsets, gammas=gammas)  # type: ignore[arg-type]


def augment_scene(
    image: np.ndarray, label: np.ndarray, aug: SceneAugmentation
) -> tuple[torch.Tensor, np.ndarray]:
    """Apply ``aug`` to one scene: mirror, colour (image only), then one warp of both.

    Args:
        image: (3, H, W) uint8 RGB.
        label: (H, W) uint8 trainIds (255 ignore), flipped or not (see the module note).
        aug: from :func:`draw_augmentation` (or built by hand).

    Returns:
        ``(image (3, H, W) float32 in [-1, 1], label (H, W) uint8)``: the image as
        :func:`~lidcseg.data.scenes.dataset.normalize_rgb` would give it, pixels from
        outside the scene black (-1) in the image and 255 in the label.
    """
    if aug.mirror:
        image, label = image[..., ::-1], label[..., ::-1]
    x = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32) / 127.5 - 1.0
    if aug.gammas is not None:
        x = colour_gamma(x, aug.gammas)
    if aug.offsets is None:
        return x, np.ascontiguousarray(label)
    grid = warp_grid(aug, x.shape[-2], x.shape[-1])
    x = resample(x + 1.0, grid, "bilinear") - 1.0  # zeros outside: black
    lab = torch.from_numpy(np.ascontiguousarray(label)).to(torch.float32)[None] + 1.0  # 0 = outside
    lab = resample(lab, grid, "nearest")[0]
    out = torch.where(lab == 0, float(IGNORE_INDEX), lab - 1.0).round().to(torch.uint8)
    return x.clamp_(-1.0, 1.0), out.numpy()


def colour_gamma(x: torch.Tensor, gammas: tuple[float, float, float]) -> torch.Tensor:
    """Per-channel gamma, each channel's mean and std kept: MONAI's ``AdjustContrast(gamma,
    retain_stats=True)`` on each channel (the authors' ``augment_gamma``), in one batched op.

    ``y = ((x - min) / (max - min + 1e-7)) ** gamma * (max - min) + min``, then shifted
    and scaled back to the channel's mean and std.

    Args:
        x: (3, H, W) float image in [-1, 1].
        gammas: (3,) one gamma per channel.

    Returns:
        (3, H, W) float32, clipped to [-1, 1].
    """
    mean, std = x.mean((1, 2), keepdim=True), x.std((1, 2), keepdim=True)
    lo = x.amin((1, 2), keepdim=True)
    span = x.amax((1, 2), keepdim=True) - lo
    gamma = torch.tensor(gammas, dtype=x.dtype).view(-1, 1, 1)
    y = ((x - lo) / (span + 1e-7)) ** gamma * span + lo
    y = y - y.mean((1, 2), keepdim=True)
    y = y / (y.std((1, 2), keepdim=True) + 1e-8) * std + mean
    return y.to(torch.float32).clamp_(-1.0, 1.0)


def warp_grid(aug: SceneAugmentation, height: int, width: int) -> torch.Tensor:
    """The dense sampling grid of ``aug``'s warp: (2, H, W) float32 MONAI coordinates.

    Output pixel ``p`` samples the input at row ``grid[0, p]``, column ``grid[1, p]``
    (pixels from the image centre): MONAI's control grid plus the elastic offsets,
    through the affine ``rotate @ shear @ translate @ scale``, upsampled bicubically
    by the spacing and centre-cropped to (H, W), as MONAI's ``Rand2DElastic`` does
    (to 1e-3 px, tested).
    """
    if aug.offsets is None:
        raise ValueError("this augmentation has no warp")
    s = aug.spacing
    control = torch.tensor(_control_grid(height, width, s))  # a copy: (3, gh, gw) homogeneous
    control[:2] += torch.from_numpy(aug.offsets)
    affine = (create_rotate(2, aug.rotate) @ create_shear(2, aug.shear)
              @ create_translate(2, aug.shift) @ create_scale(2, (aug.scale, aug.scale)))
    grid = torch.einsum("ij,jhw->ihw", torch.as_tensor(affine[:2], dtype=torch.float32), control)
    # The s-fold bicubic upsampling (align_corners=False), evaluated only inside the
    # centre crop: torch's bicubic kernel, at a third of the cost at 256 x 512.
    gh, gw = grid.shape[1:]
    top, left = gh * s // 2 - height // 2, gw * s // 2 - width // 2  # CenterSpatialCrop's corner
    rows = (torch.arange(top, top + height, dtype=torch.float32) + 0.5) * (2.0 / (s * gh)) - 1.0
    cols = (torch.arange(left, left + width, dtype=torch.float32) + 0.5) * (2.0 / (s * gw)) - 1.0
    where = torch.stack(torch.broadcast_tensors(cols[None, :], rows[:, None]), dim=-1)[None]
    return torch.nn.functional.grid_sample(grid[None], where, mode="bicubic", padding_mode="border",
                                           align_corners=False)[0]


def resample(x: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """MONAI's ``Resample(mode, padding_mode="zeros")`` on plain tensors, without its metadata cost.

    The same conventions (``norm_coords``, ``align_corners=False``, torch's
    ``grid_sample``), tested equal to MONAI's output; MONAI's MetaTensor bookkeeping
    cost 1.5 ms per call at 32 x 64, 30 times the sampling itself (measured).

    Args:
        x: (C, H, W) float32.
        grid: (2, H, W) from :func:`warp_grid`.
        mode: ``bilinear`` (images) or ``nearest`` (label maps).

    Returns:
        (C, H, W) float32, zeros where the grid leaves the image.
    """
    h, w = x.shape[-2:]
    g = torch.stack((grid[1] * (2.0 / max(2, w)), grid[0] * (2.0 / max(2, h))), dim=-1)[None]
    return torch.nn.functional.grid_sample(x[None], g, mode=mode, padding_mode="zeros", align_corners=False)[0]


@lru_cache(maxsize=8)
def _control_grid(height: int, width: int, spacing: int) -> np.ndarray:
    """MONAI's homogeneous control grid (3, gh, gw) float32 over an (H, W) image (read-only)."""
    grid = np.asarray(create_control_grid((height, width), (spacing, spacing)), dtype=np.float32)
    grid.flags.writeable = False
    return grid
