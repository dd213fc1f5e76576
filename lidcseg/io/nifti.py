"""NIfTI-1 reading and writing (nibabel), with one-line errors and deterministic bytes.

Conventions:

* a NIfTI affine maps voxel indices ``(i, j, k, 1)`` to **RAS+** world millimetres
  (x grows towards the patient's Right, y towards Anterior, z towards Superior).
  DICOM's patient coordinates are **LPS+** (x towards Left, y towards Posterior,
  z towards Superior). The two differ by the sign of x and y:
  ``A_lps = diag(-1, -1, 1, 1) @ A_ras`` (:data:`RAS_TO_LPS`);
* voxel values of a CT NIfTI are taken as Hounsfield units after the header's
  ``scl_slope``/``scl_inter`` (nibabel's ``get_fdata``);
* written files are gzip-compressed with a zero modification time and no file
  name in the gzip header, so the same array gives byte-identical files;
* 4-D outputs are streamed volume by volume (:func:`write_nifti_volumes`): the
  last axis varies slowest in NIfTI's Fortran order, so volume ``t`` is one
  contiguous block and the whole 4-D array never needs to exist in memory.
"""

from __future__ import annotations

import gzip
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import atomic_path

#: ``A_lps = RAS_TO_LPS @ A_ras`` (and back: the matrix is its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: gzip level of written files (masks and frequencies are mostly zeros: level 1
#: is several times faster than 9 and nearly as small).
GZIP_LEVEL = 1

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Longest axis a NIfTI-1 file can have: ``dim[1..7]`` are signed 16-bit integers.
MAX_NIFTI_DIM = 32767


@dataclass
class NiftiVolume:
    """A 3-D NIfTI image as read.

    Attributes:
        data: ``(I, J, K)`` float32 voxel values after scl_slope/scl_inter.
        affine: ``(4, 4)`` RAS+ affine of the image (nibabel's choice of sform/qform).
        sform: ``(4, 4)`` sform and its code (0 when unset).
        qform: ``(4, 4)`` qform and its code (0 when unset).
        path: the file.
    """

    data: np.ndarray
    affine: np.ndarray
    sform: tuple[np.ndarray, int]
    qform: tuple[np.ndarray, int]
    path: Path


def is_nifti_path(path: str | Path) -> bool:
    """Whether ``path`` is named like a NIfTI-1 file (``.nii`` or ``.nii.gz``)."""
    name = Path(path).name.lower()
    return name.endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | Path, *, what: str = "image", allow_nan: bool = False) -> NiftiVolume:
    """Read a 3-D NIfTI image.

    A 4-D image whose 4th axis has length 1 is accepted as 3-D.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        what: the role of the file in messages (``scan``, ``lesion mask``).
        allow_nan: accept NaN/inf voxels (refused by default).

    Raises:
        LidcsegError: a missing or unreadable file, not a NIfTI image, not 3-D, voxels
            that are not real numbers (complex, RGB), voxel sizes ``pixdim`` that are
            zero, negative or non-finite where no sform overrides them, a spatial unit
            other than mm (or unknown), more voxels
            than memory holds (checked before reading), non-finite voxels, or a
            singular or non-finite affine.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise LidcsegError(f"{what} file not found", path)
    # nibabel logs header repairs (a negative pixdim made positive) and numpy warns about
    # overflowing casts on stderr: every such value is checked here instead.
    with warnings.catch_warnings(), nib.imageglobals.LoggingOutputSuppressor():
        warnings.simplefilter("ignore")
        img = _load(path, what)
        shape = _check_header(img, path, what)
        try:
            data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
        except Exception as e:
            raise LidcsegError(f"cannot read the {what}'s voxels ({type(e).__name__}: {e})", path) from None
    if not allow_nan and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise LidcsegError(f"the {what} has {bad} NaN or infinite voxel(s)", path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise LidcsegError(f"the {what} has a singular or non-finite affine", path)
    sform, scode = img.header.get_sform(coded=True)
    qform, qcode = img.header.get_qform(coded=True)
    return NiftiVolume(
        data=data,
        affine=affine,
        sform=(np.asarray(sform if sform is not None else affine), int(scode)),
        qform=(np.asarray(qform if qform is not None else affine), int(qcode)),
        path=path,
    )


def _load(path: Path, what: str) -> Any:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for junk input
        raise LidcsegError(f"not a readable NIfTI {what} ({type(e).__name__})", path) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise LidcsegError(f"not a NIfTI {what} ({type(img).__name__})", path)
    return img


def _raw_header(img: Any, path: Path, what: str) -> Any:
    """The header of ``path`` as written, without nibabel's repairs."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            return type(img.header).from_fileobj(f, check=False)
    except Exception as e:  # the same junk nib.load survived
        raise LidcsegError(f"not a readable NIfTI {what} header ({type(e).__name__})", path) from None


def _check_header(img: Any, path: Path, what: str) -> tuple[int, int, int]:
    """The 3-D shape of ``img``, after checking what its header promises (nothing is read)."""
    from lidcseg.resources import check_memory

    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise LidcsegError(f"the {what} must be a 3-D volume, got shape {shape}", path)
    if min(shape) < 1:
        raise LidcsegError(f"the {what} is empty, shape {shape}", path)
    dtype = img.get_data_dtype()
    if dtype.kind not in "biuf":
        raise LidcsegError(f"the {what}'s voxel type {dtype} is not real numbers (NIfTI datatype "
                           f"{int(img.header['datatype'])})", path)
    raw = _raw_header(img, path, what)  # nibabel's header has zero/negative pixdim repaired already
    pixdim = [float(v) for v in raw["pixdim"][1:4]]
    if int(raw["sform_code"]) == 0 and not all(np.isfinite(v) and v > 0 for v in pixdim):
        # Without an sform the geometry comes from pixdim; nibabel would silently use 1 or |v|.
        raise LidcsegError(f"the {what}'s voxel sizes pixdim[1:4] = {pixdim} must be finite and > 0", path)
    unit = raw.get_xyzt_units()[0]
    if unit not in ("unknown", "mm"):
        raise LidcsegError(f"the {what}'s spatial unit is {unit} (xyzt_units); lidcseg reads mm only", path)
    n = int(np.prod(shape, dtype=np.float64))
    check_memory(8.0 * n, f"reading the {what}'s {' x '.join(map(str, shape))} voxels", "is the header's shape right?",
                 where=path)
    return shape  # type: ignore[return-value]


def make_header(
    shape: tuple[int, ...],
    dtype: np.dtype | type,
    affine: np.ndarray,
    *,
    sform_code: int = 1,
    qform_code: int = 1,
    qform: np.ndarray | None = None,
    description: str = "",
) -> Any:
    """A ``nibabel.Nifti1Header`` for ``shape`` and ``dtype`` with ``affine`` as sform (and qform).

    ``qform`` defaults to ``affine``; a qform code of 0 leaves it unset. Units are
    mm; the voxel sizes are the affine's column norms (1 for a 4th axis).

    Raises:
        LidcsegError: an axis longer than :data:`MAX_NIFTI_DIM` (or empty).
    """
    import nibabel as nib

    if any(not 1 <= int(s) <= MAX_NIFTI_DIM for s in shape):
        raise LidcsegError(f"shape {tuple(shape)} does not fit a NIfTI-1 file: every axis must be 1 to {MAX_NIFTI_DIM}")
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.dtype(dtype))
    hdr.set_data_shape(tuple(int(s) for s in shape))
    zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    hdr.set_zooms(tuple(float(z) for z in zooms) + (1.0,) * (len(shape) - 3))
    hdr.set_sform(np.asarray(affine, dtype=np.float64), code=int(sform_code))
    if qform_code:
        hdr.set_qform(np.asarray(affine if qform is None else qform, dtype=np.float64), code=int(qform_code))
    else:
        hdr.set_qform(None, code=0)
    hdr.set_xyzt_units(xyz="mm")
    hdr["descrip"] = description.encode("ascii", "replace")[:79]
    return hdr


def write_nifti_volumes(
    path: str | Path,
    header: Any,
    volumes: Iterable[np.ndarray],
) -> None:
    """Stream a 3-D or 4-D NIfTI file atomically, one 3-D volume at a time.

    Args:
        path: the destination (``.nii.gz`` gzip-compresses; ``.nii`` does not).
        header: from :func:`make_header`; its shape ``(I, J, K)`` or ``(I, J, K, T)``
            and dtype fix what ``volumes`` must be.
        volumes: ``T`` arrays of shape ``(I, J, K)`` (one for a 3-D file), in order.

    Raises:
        ValueError: a volume of the wrong shape, or the wrong number of volumes.
    """
    shape = tuple(int(s) for s in header.get_data_shape())
    dtype = header.get_data_dtype()
    expected = shape[3] if len(shape) == 4 else 1
    path = Path(path)
    compress = path.name.lower().endswith(".gz")
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL, mtime=0) \
            if compress else raw
        try:
            header.write_to(out)
            count = 0
            for vol in volumes:
                if tuple(vol.shape) != shape[:3]:
                    raise ValueError(f"volume {count} has shape {vol.shape}, expected {shape[:3]}")
                out.write(np.asarray(vol, dtype=dtype).tobytes(order="F"))
                count += 1
            if count != expected:
                raise ValueError(f"wrote {count} volumes, the header says {expected}")
        finally:
            if compress:
                out.close()


def write_nifti(path: str | Path, data: np.ndarray, header: Any) -> None:
    """Write one 3-D array ``(I, J, K)`` with ``header`` (see :func:`make_header`)."""
    write_nifti_volumes(path, header, [data])


def iter_volumes(data: np.ndarray) -> Iterator[np.ndarray]:
    """The 3-D volumes ``data[..., t]`` of a 4-D array (for :func:`write_nifti_volumes`)."""
    for t in range(data.shape[3]):
        yield data[..., t]
