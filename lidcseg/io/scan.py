"""A CT scan read from a NIfTI file or a DICOM series folder, in one canonical axial order.

Whatever the input's voxel order, the scan is held as axial slices in the
order the crops of :mod:`lidcseg.data.crops` (and so the models) were made in:

* ``slice_hu(k)`` is a ``(R, C)`` float32 slice in HU; row ``r`` lies at world
  ``y = origin_y + r * spacing_y`` and column ``c`` at ``x = origin_x + c * spacing_x``;
* slice ``k`` lies at world ``z[k]``, ascending (k = 0 is the lowest z, pylidc's order);
* world coordinates are DICOM patient coordinates, **LPS+** millimetres
  (x towards the patient's Left, y towards Posterior, z towards Superior).

The *input order* is the voxel order of the input array, the one every output
NIfTI is written in: for a NIfTI, its own ``(i, j, k)``; for a DICOM series,
``(i, j, k)`` = (column, row, slice sorted by ascending z), as dcm2niix-style
converters store it. :meth:`ScanVolume.to_input` maps a canonical ``(K, R, C)``
array to the input order (a transposition and flips, never an interpolation).

Supported geometry: every voxel axis parallel to a world axis (any permutation
and signs) with the slice axis along z; oblique or tilted grids are refused.
NIfTI voxel values are taken as HU (after ``scl_slope``/``scl_inter``); DICOM
pixels are rescaled to HU with RescaleSlope/RescaleIntercept (SimpleITK).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.errors import LidcsegError
from lidcseg.io.nifti import RAS_TO_LPS, is_nifti_path, read_nifti

#: Largest off-axis direction cosine accepted as "parallel to a world axis".
AXIS_TOL = 1e-3
#: Largest voxel size accepted, mm (as :data:`lidcseg.io.dicom.MAX_PIXEL_SPACING_MM`).
MAX_VOXEL_MM = 100.0


@dataclass
class ScanVolume:
    """A CT scan in canonical axial order (see the module docstring).

    Attributes:
        kind: ``nifti`` or ``dicom``.
        path: the NIfTI file or the DICOM series folder.
        shape: canonical ``(K, R, C)``.
        z: ``(K,)`` ascending world z of each slice, mm.
        origin_xy: world (x, y) of canonical pixel (row 0, column 0), mm (LPS).
        spacing_xy: pixel size along x (columns) and y (rows), mm.
        input_shape: shape of the input-order array (the outputs' shape).
        axes: for canonical axes (k, r, c), the input axis each one comes from.
        flips: for canonical axes (k, r, c), whether the input runs the other way.
        slice_spacing: mean distance between slices, mm (one-slice scans: the affine's).
        affine_ras: ``(4, 4)`` RAS+ affine of the input-order array (outputs use it).
        sform, qform: the input's NIfTI sform/qform with their codes (DICOM: the affine, code 1).
        files: DICOM only: ``files[k]`` is canonical slice ``k``.
        series_uid: DICOM only: SeriesInstanceUID.
        warnings: what was tolerated (duplicate slices, uneven spacing).
    """

    kind: str
    path: Path
    shape: tuple[int, int, int]
    z: np.ndarray
    origin_xy: tuple[float, float]
    spacing_xy: tuple[float, float]
    input_shape: tuple[int, int, int]
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    slice_spacing: float
    affine_ras: np.ndarray
    sform: tuple[np.ndarray, int]
    qform: tuple[np.ndarray, int]
    files: list[Path] = field(default_factory=list)
    series_uid: str | None = None
    warnings: list[str] = field(default_factory=list)
    _volume: np.ndarray | None = field(default=None, repr=False)
    _read_slice: Callable[[int], np.ndarray] | None = field(default=None, repr=False)
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    # -- voxels ----------------------------------------------------------------------------

    def slice_hu(self, k: int) -> np.ndarray:
        """Canonical slice ``k`` in HU: ``(R, C)`` float32 (row = y, column = x)."""
        if self._volume is not None:
            return self._volume[k]
        if k not in self._cache:
            assert self._read_slice is not None
            self._cache[k] = self._read_slice(k)
        return self._cache[k]

    def to_input(self, canonical: np.ndarray) -> np.ndarray:
        """A canonical ``(K, R, C)`` array in the input's voxel order ``input_shape`` (a view)."""
        arr = canonical
        for ax, flip in enumerate(self.flips):
            if flip:
                arr = np.flip(arr, axis=ax)
        return arr.transpose(tuple(int(a) for a in np.argsort(self.axes)))

    def to_canonical(self, data: np.ndarray) -> np.ndarray:
        """An input-order array as canonical ``(K, R, C)`` (a view); inverse of :meth:`to_input`."""
        return _to_canonical(data, self.axes, self.flips)

    # -- coordinates -----------------------------------------------------------------------

    @property
    def slice_thickness(self) -> np.ndarray:
        """``(K,)`` z extent of each slice: half the distance to each neighbour (mm).

        Equal to the slice spacing on an even grid; used for volumes in mm^3.
        """
        if len(self.z) == 1:
            return np.full(1, self.slice_spacing)
        return np.gradient(self.z)

    def input_to_canonical(self, ijk: tuple[float, float, float]) -> np.ndarray:
        """Input voxel index ``(i, j, k)`` -> canonical ``(k, r, c)`` (fractional indices allowed)."""
        out = np.empty(3)
        for ax in range(3):
            v = float(ijk[self.axes[ax]])
            n = self.input_shape[self.axes[ax]]
            out[ax] = (n - 1 - v) if self.flips[ax] else v
        return out

    def canonical_to_input(self, krc: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """Canonical ``(k, r, c)`` -> input voxel index ``(i, j, k)``."""
        return _canonical_to_input(krc, self.axes, self.flips, self.input_shape)

    def canonical_to_world(self, krc: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """Canonical ``(k, r, c)`` -> world LPS ``(x, y, z)`` mm (z interpolated between slices)."""
        k, r, c = (float(v) for v in krc)
        ks = np.arange(len(self.z), dtype=float)
        if len(self.z) > 1 and not 0 <= k <= len(self.z) - 1:  # extrapolate linearly at the ends
            i0 = 0 if k < 0 else len(self.z) - 2
            z = self.z[i0] + (k - i0) * (self.z[i0 + 1] - self.z[i0])
        else:
            z = float(np.interp(k, ks, self.z))
        return np.array([
            self.origin_xy[0] + c * self.spacing_xy[0],
            self.origin_xy[1] + r * self.spacing_xy[1],
            z,
        ])

    def world_to_canonical(self, xyz: tuple[float, float, float]) -> np.ndarray:
        """World LPS ``(x, y, z)`` mm -> canonical ``(k, r, c)``; k is fractional (interpolated)."""
        x, y, z = (float(v) for v in xyz)
        c = (x - self.origin_xy[0]) / self.spacing_xy[0]
        r = (y - self.origin_xy[1]) / self.spacing_xy[1]
        zs = self.z
        if len(zs) == 1:
            k = (z - zs[0]) / self.slice_spacing
        elif z < zs[0]:
            k = (z - zs[0]) / (zs[1] - zs[0])
        elif z > zs[-1]:
            k = len(zs) - 1 + (z - zs[-1]) / (zs[-1] - zs[-2])
        else:
            k = float(np.interp(z, zs, np.arange(len(zs), dtype=float)))
        return np.array([k, r, c])

    def contains(self, krc: np.ndarray) -> bool:
        """Whether canonical ``(k, r, c)`` lies within the volume (within half a voxel of its edge)."""
        return all(-0.5 <= float(v) <= n - 0.5 for v, n in zip(krc, self.shape, strict=True))


def _to_canonical(
    data: np.ndarray, axes: tuple[int, int, int], flips: tuple[bool, bool, bool]
) -> np.ndarray:
    arr = data.transpose(axes)
    for ax, flip in enumerate(flips):
        if flip:
            arr = np.flip(arr, axis=ax)
    return arr


def _canonical_to_input(
    krc: np.ndarray | tuple[float, float, float],
    axes: tuple[int, int, int],
    flips: tuple[bool, bool, bool],
    input_shape: tuple[int, ...],
) -> np.ndarray:
    out = np.empty(3)
    for ax in range(3):
        n = input_shape[axes[ax]]
        v = float(krc[ax])
        out[axes[ax]] = (n - 1 - v) if flips[ax] else v
    return out


def _canonical_axes(affine_lps: np.ndarray, path: Path) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], np.ndarray]:
    """For an LPS affine: the input axis of world z, y, x, whether each runs backwards, and spacings.

    Raises:
        LidcsegError: an oblique grid (an axis not parallel to a world axis).
    """
    m = affine_lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)  # per input axis
    world_of = [-1, -1, -1]
    sign_of = [1.0, 1.0, 1.0]
    for a in range(3):
        d = m[:, a] / spacing[a]
        w = int(np.argmax(np.abs(d)))
        off = np.delete(np.abs(d), w)
        if off.max() > AXIS_TOL:
            raise LidcsegError(
                "oblique voxel grid (axes not parallel to the world axes) is not supported; "
                "resample the scan to an axial grid first",
                path,
            )
        world_of[a], sign_of[a] = w, float(np.sign(d[w]))
    if sorted(world_of) != [0, 1, 2]:
        raise LidcsegError("degenerate voxel axes (two axes along one world axis)", path)
    axes = tuple(world_of.index(w) for w in (2, 1, 0))  # canonical k <- z, r <- y, c <- x
    flips = tuple(sign_of[a] < 0 for a in axes)
    return axes, flips, spacing  # type: ignore[return-value]


def read_scan(path: str | Path) -> ScanVolume:
    """Read a NIfTI CT volume (``.nii``/``.nii.gz``) or a DICOM series folder.

    Raises:
        LidcsegError: anything that is neither, or a bad image (see :func:`read_nifti_scan`
            and :func:`read_dicom_scan`).
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_scan(path)
    if not path.exists():
        raise LidcsegError("scan not found", path)
    if is_nifti_path(path):
        return read_nifti_scan(path)
    raise LidcsegError("not a scan: expected a NIfTI file (.nii, .nii.gz) or a DICOM series folder", path)


def read_nifti_scan(path: str | Path) -> ScanVolume:
    """Read a 3-D NIfTI CT volume (values taken as HU) into canonical axial order.

    Raises:
        LidcsegError: not a NIfTI image, not 3-D, NaN voxels (:func:`lidcseg.io.nifti.read_nifti`),
            an oblique grid, or voxels larger than :data:`MAX_VOXEL_MM`.
    """
    nii = read_nifti(path, what="scan")
    path = Path(path)
    lps = RAS_TO_LPS @ nii.affine
    axes, flips, spacing = _canonical_axes(lps, path)
    if spacing.max() > MAX_VOXEL_MM:
        raise LidcsegError(f"voxel size {', '.join(f'{v:.6g}' for v in spacing)} mm: larger than "
                           f"{MAX_VOXEL_MM:g} mm is not a CT grid (check the affine's units)", path)
    shape_in = tuple(int(s) for s in nii.data.shape)
    volume = np.ascontiguousarray(_to_canonical(nii.data, axes, flips), dtype=np.float32)
    k_n = volume.shape[0]
    first = _canonical_to_input((0.0, 0.0, 0.0), axes, flips, shape_in)  # canonical (0, 0, 0)
    origin = lps[:3, :3] @ first + lps[:3, 3]
    dz = spacing[axes[0]]
    return ScanVolume(
        kind="nifti",
        path=path,
        shape=tuple(volume.shape),  # type: ignore[arg-type]
        z=origin[2] + dz * np.arange(k_n, dtype=float),
        origin_xy=(float(origin[0]), float(origin[1])),
        spacing_xy=(float(spacing[axes[2]]), float(spacing[axes[1]])),
        input_shape=shape_in,  # type: ignore[arg-type]
        axes=axes,
        flips=flips,
        slice_spacing=float(dz),
        affine_ras=nii.affine,
        sform=nii.sform,
        qform=nii.qform,
        _volume=volume,
    )


def read_dicom_scan(folder: str | Path) -> ScanVolume:
    """Read the headers of a DICOM CT series folder; pixels are read per slice on demand.

    Rules: one SeriesInstanceUID, axial images (ImageOrientationPatient
    ``1,0,0,0,1,0``), one size and pixel spacing, slices stacked (same x, y).
    Slices are sorted by z; of duplicated z positions the lower InstanceNumber is
    kept (a warning). Uneven slice spacing is kept exactly in ``z`` (the output
    NIfTI's affine then has the mean spacing; a warning).

    Raises:
        LidcsegError: no files, a file whose header :func:`lidcseg.io.dicom.read_header`
            refuses (corrupt, truncated, undecodable, multi-frame, not grey, non-finite
            geometry, RescaleSlope 0), several series, or geometry outside the rules.
    """
    from lidcseg.io.dicom import (
        check_stack,
        list_dicom_files,
        read_dicom_hu,
        read_header,
        sort_by_z,
    )

    folder = Path(folder)
    files = list_dicom_files(folder)
    if not files:
        raise LidcsegError("no DICOM files in the folder", folder)
    headers = [read_header(p) for p in files]
    uids = sorted({h.series_uid for h in headers})
    if len(uids) > 1:
        raise LidcsegError(f"the folder holds {len(uids)} DICOM series; give one series folder", folder)
    kept, warnings = sort_by_z(check_stack(headers))
    first = kept[0]
    z = np.array([h.z for h in kept], dtype=float)
    rows, cols = first.shape
    row_sp, col_sp = first.spacing
    dz = float(np.diff(z).mean()) if len(z) > 1 else 1.0
    if len(z) > 2 and np.abs(np.diff(z) - dz).max() > 0.01:
        warnings.append(
            f"uneven slice spacing ({np.diff(z).min():g} to {np.diff(z).max():g} mm): the output NIfTI "
            f"affine has the mean spacing {dz:g} mm"
        )
    # Input order (i, j, k) = (column, row, slice): LPS affine, then RAS for NIfTI outputs.
    lps = np.eye(4)
    lps[:3, :3] = np.diag([col_sp, row_sp, dz])
    lps[:3, 3] = [first.position[0], first.position[1], z[0]]
    ras = RAS_TO_LPS @ lps
    kept_files = [h.path for h in kept]

    def read_slice(k: int) -> np.ndarray:
        return read_dicom_hu(kept_files[k], (rows, cols))

    return ScanVolume(
        kind="dicom",
        path=folder,
        shape=(len(kept), rows, cols),
        z=z,
        origin_xy=(float(first.position[0]), float(first.position[1])),
        spacing_xy=(float(col_sp), float(row_sp)),
        input_shape=(cols, rows, len(kept)),
        axes=(2, 1, 0),
        flips=(False, False, False),
        slice_spacing=dz,
        affine_ras=ras,
        sform=(ras, 1),
        qform=(ras, 1),
        files=kept_files,
        series_uid=uids[0],
        warnings=warnings,
        _read_slice=read_slice,
    )


def scan_info(scan: ScanVolume) -> dict[str, Any]:
    """A JSON-ready description of a scan's geometry (for summaries)."""
    return {
        "kind": scan.kind,
        "shape": list(scan.input_shape),
        "affine_ras": np.round(scan.affine_ras, 6).tolist(),
        "spacing_xy_mm": [round(v, 6) for v in scan.spacing_xy],
        "z_range_mm": [round(float(scan.z[0]), 4), round(float(scan.z[-1]), 4)],
        "slices": int(scan.shape[0]),
        "warnings": list(scan.warnings),
    }
