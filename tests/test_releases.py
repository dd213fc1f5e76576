"""``lidcseg import``: the LIDCv1 pickle and the LIDCv2 PNG crops, on tiny fixtures in the releases' layouts."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lidcseg.data.releases import (
    import_hpunet_png,
    import_pytorch_pickle,
    safe_load_pickle,
)
from lidcseg.data.store import CropStore
from lidcseg.errors import LidcsegError

# --------------------------------------------------------------------------- fixtures


def v1_entries(n_patients: int = 3, per_patient: int = 2, size: int = 128, seed: int = 0) -> dict[str, Any]:
    """A dict in the layout of the PyTorch port's ``data_lidc.pickle``.

    Keys ``LIDC-IDRI-####_slice<k>``; values ``{'image': (S, S) float32 in [0, 1],
    'masks': [4 x (S, S) uint8 0/1], 'series_uid': str}``. The last slice of patient 0 has
    only 3 masks; the first slice's grader 3 mask is empty.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    data: dict[str, Any] = {}
    for p in range(n_patients):
        pid = f"LIDC-IDRI-{p + 1:04d}"
        for s in range(per_patient):
            image = (rng.integers(0, 256, (size, size)) / 255.0).astype(np.float32)
            masks = [
                ((yy - 64) ** 2 + (xx - 64) ** 2 < (8 + 2 * g) ** 2).astype(np.uint8) for g in range(4)
            ]
            if p == 0 and s == 0:
                masks[3][:] = 0
            if p == 0 and s == per_patient - 1:
                masks = masks[:3]
            data[f"{pid}_slice{10 + s}"] = {
                "image": image, "masks": masks, "series_uid": f"1.3.6.1.4.1.{p + 1}",
            }
    return data


def write_pickle(path: Path, obj: Any) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


#: LIDCv2 fixture: split -> patient -> [(z, crop, n_masks)]
V2_LAYOUT: dict[str, dict[str, list[tuple[str, int, int]]]] = {
    "train": {"LIDC-IDRI-0001": [("-105.5", 0, 4), ("-103.0", 0, 4)], "LIDC-IDRI-0002": [("42.0", 1, 3)]},
    "val": {"LIDC-IDRI-0003": [("10.0", 0, 4)]},
    "test": {"LIDC-IDRI-0004": [("7.5", 0, 4), ("7.5", 1, 4)]},
}


def make_v2_tree(root: Path, size: int = 180, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[Path, np.ndarray]:
    """PNG crops in the HPU-Net release layout; returns every PNG's pixel array by path.

    ``train`` is nested as the archive unpacks (``lidc_crops_train/train/...``), the others
    flat (``val/...``). Images are 8-bit grey; masks are 0/255 with the ``_l0.._l3`` suffix.
    """
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size]
    written: dict[Path, np.ndarray] = {}
    for split in splits:
        base = root / f"lidc_crops_{split}" / split if split == "train" else root / split
        for patient, crops in V2_LAYOUT[split].items():
            for z, c, n_masks in crops:
                stem = f"z-{z}_c{c}"
                img = rng.integers(0, 256, (size, size)).astype(np.uint8)
                write_png(base / "images" / patient / f"{stem}.png", img)
                written[base / "images" / patient / f"{stem}.png"] = img
                for g in range(n_masks):
                    m = (((yy - 90) ** 2 + (xx - 90) ** 2) < (5 + 3 * g) ** 2).astype(np.uint8) * 255
                    write_png(base / "gt" / patient / f"{stem}_l{g}.png", m)
                    written[base / "gt" / patient / f"{stem}_l{g}.png"] = m
    return written


@pytest.fixture
def v1_pickle(tmp_path: Path) -> Path:
    return write_pickle(tmp_path / "data_lidc.pickle", v1_entries())


@pytest.fixture
def v2_root(tmp_path: Path) -> Path:
    make_v2_tree(tmp_path / "lidc_crops")
    return tmp_path / "lidc_crops"


def read_split(out: Path, split: str) -> tuple[Any, dict[str, Any]]:
    with CropStore(out / f"{split}.h5") as store:
        return store.read_all(), dict(store.attrs)


# --------------------------------------------------------------------------- LIDCv1 pickle


def test_pickle_import_writes_three_patient_disjoint_splits(v1_pickle: Path, tmp_path: Path) -> None:
    data = v1_entries()
    out = tmp_path / "data"
    summary = import_pytorch_pickle(v1_pickle, out, seed=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == summary.manifest
    assert manifest["source"] == "pytorch-pickle" and manifest["release"] == "LIDCv1"
    assert manifest["intensity"] == "unit-float-x255" and manifest["intensity_scale"] == 255.0
    assert manifest["seed"] == 3 and manifest["crop_size"] == 128
    assert manifest["quantisation_max_error"] < 1e-6  # the fixture's floats are k / 255

    seen: dict[str, str] = {}
    total = 0
    for split in ("train", "val", "test"):
        batch, attrs = read_split(out, split)
        assert attrs["intensity"] == "unit-float-x255" and attrs["split"] == split
        info = manifest["splits"][split]
        assert info["crops"] == len(batch) == 2 and info["patients"] == 1  # 3 patients: 1 each
        total += len(batch)
        for r in range(len(batch)):
            pid = batch.meta["patient_id"][r]
            assert seen.setdefault(pid, split) == split  # no patient in two splits
            key = f"{pid}_slice{batch.meta['slice_index'][r]}"
            src = data[key]
            np.testing.assert_array_equal(batch.image[r], np.rint(src["image"] * 255).astype(np.int16))
            n = len(src["masks"])
            assert batch.meta["n_graders"][r] == n
            for g in range(4):
                want = src["masks"][g] if g < n else np.zeros((128, 128), np.uint8)
                np.testing.assert_array_equal(batch.masks[r, g], want)
        assert (batch.meta["scan_id"] == -1).all()
        assert np.isnan(batch.meta["z_mm"]).all() and np.isnan(batch.meta["centre_mm"]).all()
        assert batch.image.dtype == np.int16 and batch.masks.dtype == np.uint8
    assert total == 6 and sorted(seen) == ["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"]


def test_pickle_split_is_seeded_and_deterministic(tmp_path: Path) -> None:
    src = write_pickle(tmp_path / "p.pickle", v1_entries(n_patients=10, per_patient=1, size=16))
    a = import_pytorch_pickle(src, tmp_path / "a", seed=1).manifest["splits"]
    b = import_pytorch_pickle(src, tmp_path / "b", seed=1).manifest["splits"]
    assert a == b
    others = [import_pytorch_pickle(src, tmp_path / f"s{s}", seed=s).manifest["splits"] for s in (2, 3, 4)]
    assert any(o["test"]["patient_ids"] != a["test"]["patient_ids"] for o in others)


def test_pickle_key_without_lidc_id_falls_back(tmp_path: Path) -> None:
    img = np.zeros((8, 8), np.float32)
    masks = [np.zeros((8, 8), np.uint8)] * 4
    data = {
        "pat7_z-12.5_c1": {"image": img, "masks": masks, "series_uid": "1.2"},
        "nounderscore": {"image": img, "masks": masks, "series_uid": "1.2.840.99"},
    }
    summary = import_pytorch_pickle(write_pickle(tmp_path / "p.pickle", data), tmp_path / "out")
    batch, _ = read_split(tmp_path / "out", "train")
    rows = dict(zip(batch.meta["patient_id"], range(len(batch)), strict=True))
    assert set(rows) == {"pat7", "1.2.840.99"} and summary.crops("train") == 2
    assert batch.meta["z_mm"][rows["pat7"]] == 12.5 and batch.meta["lesion_id"][rows["pat7"]] == 1


class _Evil:
    """Pickles as a call of ``fn(*args)``."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "subprocess.Popen", "builtins.__import__",
                                    "builtins.getattr"])
def test_malicious_pickle_is_refused_and_never_runs(attack: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {
        "os.system": _Evil(os.system, f"touch {marker}"),
        "builtins.eval": _Evil(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "subprocess.Popen": _Evil(subprocess.Popen, ["touch", str(marker)]),
        "builtins.__import__": _Evil(builtins.__import__, "os"),
        "builtins.getattr": _Evil(builtins.getattr, "text", "upper"),
    }[attack]
    # hidden inside an otherwise well-formed release, after a real slice
    data = v1_entries(n_patients=1, per_patient=1, size=8)
    data["LIDC-IDRI-0009_slice1"] = {"image": np.zeros((8, 8)), "masks": [payload], "series_uid": "x"}
    src = write_pickle(tmp_path / "evil.pickle", data)
    out = tmp_path / "out"
    with pytest.raises(LidcsegError) as e:
        import_pytorch_pickle(src, out)
    msg = str(e.value)
    assert str(src) in msg and "refusing" in msg
    assert attack.split(".")[-1] in msg  # names the forbidden global (os.system pickles as posix.system)
    assert "\n" not in msg
    assert not marker.exists()
    assert not out.exists()


def test_safe_load_pickle_reads_all_protocols(tmp_path: Path) -> None:
    obj = {"a": [np.arange(6, dtype=np.float32).reshape(2, 3), np.float64(2.5), np.int16(3)],
           "b": (1, 2.0, "s", b"x", None, True), "c": {1, 2}}
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{proto}"
        path.write_bytes(pickle.dumps(obj, protocol=proto))
        got = safe_load_pickle(path)
        np.testing.assert_array_equal(got["a"][0], obj["a"][0])
        assert got["a"][1:] == obj["a"][1:] and got["b"] == obj["b"] and got["c"] == obj["c"]


def _bad_entry(**change: Any) -> dict[str, Any]:
    data = v1_entries(n_patients=2, per_patient=1, size=16)
    key = next(iter(data))
    data[key] = {**data[key], **change}
    return data


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        ("missing", None, "no such file"),
        ("text", b"hello, not a pickle", "not a readable pickle"),
        ("truncated", pickle.dumps(v1_entries(1, 1, 8))[:-20], "not a readable pickle"),
        ("list", pickle.dumps([1, 2]), "expected a dict"),
        ("empty", pickle.dumps({}), "no slices"),
        ("nomasks", pickle.dumps({"LIDC-IDRI-0001_s": {"image": np.zeros((4, 4))}}), "'image' and 'masks'"),
        ("shape", pickle.dumps(_bad_entry(image=np.zeros((16, 12), np.float32))), "square 2-D"),
        ("size", pickle.dumps(_bad_entry(image=np.zeros((8, 8), np.float32), masks=[np.zeros((8, 8))] * 4)), "differs"),
        ("maskshape", pickle.dumps(_bad_entry(masks=[np.zeros((8, 8))] * 4)), "mask 0 has shape"),
        ("nan", pickle.dumps(_bad_entry(image=np.full((16, 16), np.nan, np.float32))), "NaN"),
        ("range", pickle.dumps(_bad_entry(image=np.full((16, 16), 300.0, np.float32))), "expected [0, 1]"),
        ("fivemasks", pickle.dumps(_bad_entry(masks=[np.zeros((16, 16))] * 5)), "1 to 4 arrays"),
    ],
)
def test_pickle_bad_input_is_one_line_naming_the_file(name: str, content: bytes | None, expect: str, tmp_path: Path) -> None:
    src = tmp_path / f"{name}.pickle"
    if content is not None:
        src.write_bytes(content)
    with pytest.raises(LidcsegError) as e:
        import_pytorch_pickle(src, tmp_path / "out")
    assert expect in str(e.value) and str(src) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_existing_manifest_needs_overwrite_and_failed_overwrite_keeps_old(v1_pickle: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    import_pytorch_pickle(v1_pickle, out, seed=0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(LidcsegError, match="--overwrite"):
        import_pytorch_pickle(v1_pickle, out, seed=1)
    bad = write_pickle(tmp_path / "bad.pickle", _bad_entry(image=np.full((16, 16), np.nan)))
    with pytest.raises(LidcsegError, match="NaN"):
        import_pytorch_pickle(bad, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no leftovers
    import_pytorch_pickle(v1_pickle, out, seed=1, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1
    assert sorted(p.name for p in out.iterdir()) == [".lidcseg-output.json", "manifest.json", "test.h5", "train.h5", "val.h5"]


# --------------------------------------------------------------------------- LIDCv2 PNGs


def test_png_import_keeps_release_split_and_values(v2_root: Path, tmp_path: Path) -> None:
    written = make_v2_tree(tmp_path / "again")  # same RNG: same pixels as v2_root
    out = tmp_path / "data"
    summary = import_hpunet_png(v2_root, out)
    m = json.loads((out / "manifest.json").read_text())
    assert m == summary.manifest
    assert m["intensity"] == "png-uint8" and m["release"] == "LIDCv2" and m["crop_size"] == 180
    assert m["seed"] is None and m["spacing_mm"] == 0.5
    for split, patients in V2_LAYOUT.items():
        batch, attrs = read_split(out, split)
        assert attrs["intensity"] == "png-uint8" and attrs["split"] == split
        crops = [(p, z, c, n) for p, cs in patients.items() for z, c, n in cs]
        assert len(batch) == m["splits"][split]["crops"] == len(crops)
        assert m["splits"][split]["patient_ids"] == sorted(patients)
        base = (tmp_path / "again" / "lidc_crops_train" / "train") if split == "train" else tmp_path / "again" / split
        for r in range(len(batch)):
            pid, z = batch.meta["patient_id"][r], batch.meta["z_mm"][r]
            (p, zs, c, n), = [t for t in crops if t[0] == pid and float(t[1]) == z and t[2] == batch.meta["lesion_id"][r]]
            stem = f"z-{zs}_c{c}"
            np.testing.assert_array_equal(batch.image[r], written[base / "images" / p / f"{stem}.png"])
            assert batch.meta["n_graders"][r] == n
            for g in range(4):
                want = written[base / "gt" / p / f"{stem}_l{g}.png"] > 0 if g < n else np.zeros((180, 180), bool)
                np.testing.assert_array_equal(batch.masks[r, g], want.astype(np.uint8))
        # within a patient, rows run in ascending z; slice_index counts them
        for pid in patients:
            rows = np.flatnonzero(batch.meta["patient_id"] == pid)
            assert list(batch.meta["slice_index"][rows]) == list(range(len(rows)))
            assert np.all(np.diff(batch.meta["z_mm"][rows]) >= 0)


def test_png_only_one_split_present(tmp_path: Path) -> None:
    make_v2_tree(tmp_path / "src", splits=("test",))
    summary = import_hpunet_png(tmp_path / "src", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lidcseg-output.json", "manifest.json", "test.h5"]
    assert summary.crops("test") == 2 and summary.crops("train") == 0


def test_png_graders_numbered_from_one(tmp_path: Path) -> None:
    """The README numbers graders ``_l1.._l4``; the files in use ``_l0.._l3``: both import."""
    written = make_v2_tree(tmp_path / "src", splits=("val",))
    for path in sorted((p for p in written if "/gt/" in p.as_posix()), reverse=True):
        stem, g = path.stem.rsplit("_l", 1)
        path.rename(path.with_name(f"{stem}_l{int(g) + 1}.png"))
    import_hpunet_png(tmp_path / "src", tmp_path / "out")
    batch, _ = read_split(tmp_path / "out", "val")
    want = [written[p] > 0 for p in sorted(written) if "/gt/" in p.as_posix()]
    np.testing.assert_array_equal(batch.masks[0], np.stack(want).astype(np.uint8))


def _break(root: Path, how: str) -> Path:
    """Damage a fresh LIDCv2 tree under ``root``; return the path the error must name."""
    written = make_v2_tree(root)
    paths = {p.relative_to(root).as_posix(): p for p in written}
    val_img = paths["val/images/LIDC-IDRI-0003/z-10.0_c0.png"]
    val_mask = paths["val/gt/LIDC-IDRI-0003/z-10.0_c0_l2.png"]
    if how == "masksize":  # in val, after train was converted: no partial output either
        write_png(val_mask, np.zeros((170, 180), np.uint8))
        return val_mask
    if how == "nomasks":
        for g in range(4):
            paths[f"val/gt/LIDC-IDRI-0003/z-10.0_c0_l{g}.png"].unlink()
        return val_img
    if how == "orphan":
        orphan = val_mask.with_name("z-11.0_c0_l0.png")
        write_png(orphan, np.zeros((180, 180), np.uint8))
        return orphan
    if how == "16bit":
        Image.fromarray(np.zeros((180, 180), np.uint16)).save(val_img)
        return val_img
    if how == "notpng":
        val_img.write_bytes(b"garbage")
        return val_img
    if how == "imagesize":
        write_png(val_img, np.zeros((100, 100), np.uint8))
        return val_img
    if how == "unknownsplit":
        (root / "val").rename(root / "misc")
        return root / "misc"
    raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "expect"),
    [
        ("masksize", "mask is 180x170, its image 180x180"),
        ("nomasks", "no grader masks"),
        ("orphan", "grader mask without an image"),
        ("16bit", "expected 8-bit grey"),
        ("notpng", "not a readable PNG"),
        ("imagesize", "others 180x180"),
        ("unknownsplit", "cannot tell the split"),
    ],
)
def test_png_bad_input_is_one_line_and_leaves_nothing(how: str, expect: str, tmp_path: Path) -> None:
    named = _break(tmp_path / "src", how)
    out = tmp_path / "out"
    with pytest.raises(LidcsegError) as e:
        import_hpunet_png(tmp_path / "src", out)
    assert expect in str(e.value) and str(named) in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_png_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(LidcsegError, match="no such folder"):
        import_hpunet_png(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LidcsegError, match="no images/ and gt/ folders"):
        import_hpunet_png(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "nopng" / "test" / "images" / "LIDC-IDRI-0001").mkdir(parents=True)
    (tmp_path / "nopng" / "test" / "gt").mkdir()
    with pytest.raises(LidcsegError, match="no PNG images"):
        import_hpunet_png(tmp_path / "nopng", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli() -> Any:
    from lidcseg_cli.main import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["import", *map(str, args)])


def test_cli_pickle_and_png(cli: Any, v1_pickle: Path, v2_root: Path, tmp_path: Path) -> None:
    r = cli("pytorch-pickle", v1_pickle, "--out", tmp_path / "v1", "--seed", 5)
    assert r.exit_code == 0, r.output
    assert "train" in r.stdout and "manifest.json" in r.stdout
    assert json.loads((tmp_path / "v1" / "manifest.json").read_text())["seed"] == 5
    r = cli("hpunet-png", v2_root, "--out", tmp_path / "v2")
    assert r.exit_code == 0, r.output
    assert "png-uint8" in r.stdout
    assert sorted(p.name for p in (tmp_path / "v2").iterdir()) == [
        ".lidcseg-output.json", "manifest.json", "test.h5", "train.h5", "val.h5"]


def _assert_one_line_error(r: Any, *needles: str) -> None:
    assert r.exit_code not in (0, None)
    assert "Traceback" not in r.output
    lines = r.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in lines[0]


def test_cli_errors_are_one_line(cli: Any, v1_pickle: Path, tmp_path: Path) -> None:
    _assert_one_line_error(cli("pytorch-pickle", tmp_path / "missing.pickle", "--out", tmp_path / "o"),
                           "missing.pickle", "no such file")
    evil = write_pickle(tmp_path / "evil.pickle", {"k": _Evil(os.system, f"touch {tmp_path / 'pwned'}")})
    _assert_one_line_error(cli("pytorch-pickle", evil, "--out", tmp_path / "o"), "evil.pickle", "system")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "src").mkdir()
    _assert_one_line_error(cli("hpunet-png", tmp_path / "src", "--out", tmp_path / "o"), "no images/ and gt/")
    assert cli("pytorch-pickle", v1_pickle, "--out", tmp_path / "o").exit_code == 0
    _assert_one_line_error(cli("pytorch-pickle", v1_pickle, "--out", tmp_path / "o"), "--overwrite")
    assert cli("pytorch-pickle", v1_pickle, "--out", tmp_path / "o", "--overwrite").exit_code == 0
