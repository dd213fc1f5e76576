"""The model's side of scan sampling: tiles in, hypotheses out, pasted back into the scan.

* :func:`cut_tiles`: every slice of every lesion resampled exactly as ``lidcseg
  prepare`` cut the training crops, centre-cropped to the model's input tile and
  normalised as in training.
* :func:`draw_hypotheses`: ``n`` foreground masks per tile in a few batched model
  calls, with the noise shared by a lesion's slices (see :mod:`lidcseg.sampling`) and
  :func:`lidcseg.inference.draw_foreground`'s one foreground rule.
* :func:`paste_back`: each lesion's masks, nearest neighbour, onto the scan's
  voxel grid within the tile's footprint; :func:`hypothesis_volume` ORs the
  lesions of one hypothesis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lidcseg.config import DataConfig, ModelConfig
from lidcseg.data.crops import resample_to_grid
from lidcseg.data.transforms import normalize_hu
from lidcseg.errors import LidcsegError
from lidcseg.inference import draw_foreground, lesion_noise, noise_dim
from lidcseg.io.dicom_seg import check_seg_size
from lidcseg.io.nifti import MAX_NIFTI_DIM
from lidcseg.io.scan import ScanVolume
from lidcseg.lidc.series import Series
from lidcseg.resources import check_memory, check_model_call
from lidcseg.sampling.lesions import Lesion

#: Tiles per model call.
DEFAULT_BATCH_SIZE = 32
#: Most hypotheses per lesion: hypotheses.nii.gz holds them on its 4th axis, whose length
#: is a signed 16-bit integer in the NIfTI-1 header (a DICOM SEG would allow 65535 segments).
MAX_HYPOTHESES = MAX_NIFTI_DIM


def check_hypothesis_count(n: int) -> None:
    """Refuse ``n`` hypotheses outside 1..:data:`MAX_HYPOTHESES` (before anything is read)."""
    if not 1 <= n <= MAX_HYPOTHESES:
        raise LidcsegError(
            f"-n {n}: expected 1 to {MAX_HYPOTHESES} hypotheses (the 4th axis of hypotheses.nii.gz "
            "is a 16-bit NIfTI-1 dimension)"
        )


# -- tiles ------------------------------------------------------------------------------------


@dataclass
class Tiles:
    """The model inputs of all lesions' slices.

    Attributes:
        images: (B, 1, T, T) float32, normalised as in training.
        lesion: (B,) index into the lesion list of each tile.
        k: (B,) canonical slice of each tile.
        offset: (row, col) of the T x T tile's first pixel inside the S x S crop.
        seg_pixels: DICOM input: pixels of one hypothesis in the SEG (distinct slices x rows x
            columns of the scan); 0 for NIfTI input (no SEG).
    """

    images: torch.Tensor
    lesion: np.ndarray
    k: np.ndarray
    offset: tuple[int, int]
    seg_pixels: int = 0


def centre_tile_offset(crop_size: int, input_size: int) -> tuple[int, int]:
    """(row, col) where MONAI's centre crop (the evaluation transform) starts its tile."""
    from monai.transforms import CenterSpatialCrop

    index = torch.arange(crop_size * crop_size).reshape(1, crop_size, crop_size)
    first = int(torch.as_tensor(CenterSpatialCrop((input_size, input_size))(index))[0, 0, 0])
    return divmod(first, crop_size)


def cut_tiles(
    scan: ScanVolume, lesions: Sequence[Lesion], data: DataConfig, input_size: int
) -> Tiles:
    """The centre ``input_size`` tiles of every lesion's crops, normalised as in training.

    Each slice is resampled with :func:`lidcseg.data.crops.resample_to_grid`
    onto the ``data.crop_size`` grid of ``data.spacing_mm`` pixels centred on the
    lesion, rounded to int16 HU (as :func:`lidcseg.data.crops.lesion_crops` stores
    crops), centre-cropped with MONAI's ``CenterSpatialCrop`` (as the evaluation
    transform) and normalised with :func:`lidcseg.data.transforms.normalize_hu`.

    Returns:
        :class:`Tiles` with images (B, 1, T, T), B = total slices of all lesions.
    """
    import SimpleITK as sitk
    from monai.transforms import CenterSpatialCrop

    geometry = Series(files=[], z=scan.z, origin_xy=scan.origin_xy, spacing_xy=scan.spacing_xy,
                      shape=scan.shape[1:])
    pairs = [(i, k) for i, les in enumerate(lesions) for k in les.slices]
    s = data.crop_size
    crops = np.empty((len(pairs), s, s), np.int16)
    for row, (i, k) in enumerate(pairs):
        centre = lesions[i].centre_world[:2]
        crop = resample_to_grid(scan.slice_hu(k), geometry, centre, data, data.image_interpolation,
                                data.pad_hu, sitk.sitkFloat32)
        crops[row] = np.clip(np.rint(crop), -32768, 32767).astype(np.int16)
    tiles = CenterSpatialCrop((input_size, input_size))(normalize_hu(crops))
    # A plain tensor: ops on MONAI's MetaTensor are slow (0.55 s of 0.6 s of sampling, measured).
    tiles = tiles.as_tensor() if hasattr(tiles, "as_tensor") else torch.as_tensor(tiles)
    return Tiles(
        images=tiles.contiguous()[:, None],
        lesion=np.array([i for i, _ in pairs], np.int64),
        k=np.array([k for _, k in pairs], np.int64),
        offset=centre_tile_offset(s, input_size),
        seg_pixels=len({k for _, k in pairs}) * scan.shape[1] * scan.shape[2] if scan.kind == "dicom" else 0,
    )


# -- sampling ---------------------------------------------------------------------------------


def draw_hypotheses(
    model: torch.nn.Module,
    tiles: Tiles,
    n: int,
    *,
    seed: int = 0,
    shared_eps: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, str]:
    """``n`` foreground masks per tile: (B, 1, T, T) tiles -> (B, n, T, T) bool.

    A harness model draws hypothesis k of a tile as z = mu(X) + sigma(X) * eps_k
    (Eq. 1-3) with eps from :func:`lidcseg.inference.lesion_noise`: one draw per
    lesion and hypothesis, shared by its slices, or one per tile. Both come from
    one CPU generator seeded with ``seed`` (eps first, then the model's own noise
    batch by batch), so the masks do not depend on the device.

    Args:
        model: a model with ``sample(x, n, generator=..., eps=...)``.
        tiles: from :func:`cut_tiles`.
        n: hypotheses, 1..:data:`MAX_HYPOTHESES`.
        seed: seed of the noise (a CPU ``torch.Generator``).
        shared_eps: one eps per lesion and hypothesis, shared by its slices; False: one per tile.
        batch_size: tiles per model call.
        device: where the model runs.
        on_batch: progress ``(tiles done, tiles)``.

    Returns:
        ``(masks, noise)``: masks (B, n, T, T) bool (:func:`lidcseg.inference.foreground_of`),
        and how the noise was drawn: ``shared`` or ``independent`` (eps given to the
        model), or ``model`` (no ``eps``, :func:`lidcseg.inference.noise_dim`: the model
        draws its own noise per tile from the generator). Models without a latent space
        ignore eps.
    """
    check_hypothesis_count(n)
    device = torch.device(device)
    b = tiles.images.shape[0]
    side = tiles.images.shape[-1]
    cfg = getattr(model, "config", None)
    per_call = min(batch_size, b)
    if tiles.seg_pixels:
        check_seg_size(tiles.seg_pixels, n)
    check_memory(2 * b * n * side * side + tiles.seg_pixels * n,
                 f"-n {n} hypotheses of {b} {side}x{side} tiles" + (" and their SEG" if tiles.seg_pixels else ""),
                 "lower -n")
    check_model_call(per_call, n, side, cfg if isinstance(cfg, ModelConfig) else None, device=device)
    gen = torch.Generator().manual_seed(int(seed))
    dim = noise_dim(model)
    eps = None
    noise_kind = "model"
    if dim is not None:
        n_lesions = int(tiles.lesion.max()) + 1 if b else 0
        eps = lesion_noise(n_lesions, tiles.lesion, n, dim, gen, shared_eps)
        noise_kind = "shared" if shared_eps else "independent"
    masks = np.empty((b, n, side, side), bool)
    for s in range(0, b, batch_size):
        x = tiles.images[s : s + batch_size].to(device)
        batch_eps = None if eps is None else eps[s : s + batch_size]
        fg = draw_foreground(model, x, n, generator=gen, eps=batch_eps)  # (b, n, T, T)
        masks[s : s + batch_size] = fg.cpu().numpy()
        if on_batch is not None:
            on_batch(min(s + batch_size, b), b)
    return masks, noise_kind


# -- paste-back ----------------------------------------------------------------------------


@dataclass
class Pasted:
    """One lesion's hypotheses on the scan's canonical voxel grid (a box of it).

    Attributes:
        slices: canonical slice indices of the box's planes.
        rows, cols: ``slice`` of canonical rows and columns the tiles cover.
        masks: (n, len(slices), rows, cols) bool.
    """

    slices: np.ndarray
    rows: slice
    cols: slice
    masks: np.ndarray


def _footprint(first: float, spacing: float, count: int, tile0: float, tile_sp: float, side: int) -> tuple[slice, np.ndarray]:
    """Scan voxels along one axis whose nearest tile pixel is inside the tile, and that pixel."""
    pos = first + spacing * np.arange(count)
    idx = np.rint((pos - tile0) / tile_sp).astype(np.int64)
    inside = np.nonzero((idx >= 0) & (idx < side))[0]
    if inside.size == 0:
        return slice(0, 0), np.zeros(0, np.int64)
    return slice(int(inside[0]), int(inside[-1]) + 1), idx[inside[0] : inside[-1] + 1]


def paste_back(
    scan: ScanVolume, lesions: Sequence[Lesion], tiles: Tiles, masks: np.ndarray, data: DataConfig
) -> list[Pasted]:
    """Each lesion's tile masks, nearest-neighbour resampled onto the scan's voxel grid.

    Tile pixel (r, c) of a lesion centred at (cx, cy) lies at world
    ``x = cx + (c + offset_c - (S-1)/2) * spacing_mm`` (and likewise y), as in
    :func:`lidcseg.data.crops.resample_to_grid`. Every scan voxel of a tile's
    slice takes the value of the tile pixel nearest to its centre, if that pixel
    is inside the tile; voxels outside the footprint are left out.

    Args:
        masks: (B, n, T, T) bool from :func:`draw_hypotheses`.

    Returns:
        One :class:`Pasted` per lesion.
    """
    k_n, r_n, c_n = scan.shape
    side = masks.shape[-1]
    half = (data.crop_size - 1) / 2
    sp = data.spacing_mm
    out = []
    for i, les in enumerate(lesions):
        sel = np.nonzero(tiles.lesion == i)[0]
        cx, cy = les.centre_world[:2]
        tx0 = cx + (tiles.offset[1] - half) * sp
        ty0 = cy + (tiles.offset[0] - half) * sp
        cols, ci = _footprint(scan.origin_xy[0], scan.spacing_xy[0], c_n, tx0, sp, side)
        rows, ri = _footprint(scan.origin_xy[1], scan.spacing_xy[1], r_n, ty0, sp, side)
        m = masks[sel]  # (s, n, T, T)
        box = m[:, :, ri[:, None], ci[None, :]].transpose(1, 0, 2, 3)  # (n, s, h, w)
        out.append(Pasted(tiles.k[sel], rows, cols, np.ascontiguousarray(box)))
    return out


def hypothesis_volume(scan: ScanVolume, pasted: Sequence[Pasted], h: int) -> np.ndarray:
    """Hypothesis ``h`` of all lesions (OR-ed) as a canonical (K, R, C) uint8 volume."""
    vol = np.zeros(scan.shape, np.uint8)
    for p in pasted:
        view = vol[p.slices, p.rows, p.cols]
        vol[p.slices, p.rows, p.cols] = view | p.masks[h]
    return vol
