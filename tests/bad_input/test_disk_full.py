"""A full disk loses nothing: one line naming the file, exit 2, no half-written output, and
the same command (``--resume`` for a run) continues once space is freed. Also what an
interrupted run leaves behind (temporary files, staging folders) is removed by the next
run and named in its manifest.

The disk is a real one: a small tmpfs mounted for each test (root only; the cases skip with
the reason where mounting is not allowed). Commands that write HDF5 run in a subprocess,
so that a crash of the HDF5 library (it used to segfault on a full disk) fails the test
instead of killing pytest. :class:`LatchedFile` is also checked without a tmpfs, failing
at every point of a write.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.bad_input.conftest import cli, refused
from tests.conftest import FAULT_PATIENT

KB = 1024
#: Size of each test's tmpfs.
DISK_SIZE = 4 * 2**20
_TINY_TRAIN = ["--preset", "cpu-quick", "--set", "base_channels=4", "--set", "num_scales=3",
               "--set", "fcomb_channels=8", "--set", "batch_size=4", "--set", "input_size=32",
               "--set", "val_max_crops=4", "--set", "val_samples=4", "--device", "cpu"]


# -- the disk ------------------------------------------------------------------------------


class Disk:
    """A mounted tmpfs: :meth:`fill` it up to a few bytes, :meth:`free` it again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler.bin"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def fill(self, leave: int) -> None:
        """Write a filler file so that about ``leave`` bytes stay free."""
        n = max(0, self.free_bytes() - leave)
        with open(self.filler, "ab") as f:
            while n > 0:
                k = min(n, 2**20)
                f.write(b"\0" * k)
                n -= k

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    """A fresh 4 MB tmpfs under ``tmp_path``; skipped where mounting is not allowed."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    root = tmp_path / "disk"
    root.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(root)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield Disk(root)
    finally:
        if subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)


def run_cli(*args: object, tmp_path: Path) -> SimpleNamespace:
    """``lidcseg ARGS`` in a subprocess, as :func:`refused` reads it (a crash: negative exit)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("LIDCSEG_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "lidcseg_cli.main", *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=300)
    return SimpleNamespace(exit_code=p.returncode, stdout=p.stdout, stderr=p.stderr, exception=None)


def refused_while_training(result, *needles: str) -> str:
    """:func:`refused` for a run stopped part-way: the run's own progress lines may come
    before the one error line, which is the last."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    progress = [ln for ln in lines[:-1] if ln.startswith("step ")]
    kept = SimpleNamespace(exit_code=result.exit_code, stdout=result.stdout, exception=result.exception,
                           stderr="\n".join(ln for ln in lines if ln not in progress))
    return refused(kept, *needles)


def no_temporaries(root: Path) -> None:
    """Nothing half-written under ``root``: no temporary file or staging folder of any writer."""
    left = [str(p.relative_to(root)) for p in root.rglob("*")
            if ".tmp" in p.name or p.name.startswith((".import-", ".scenes-")) or ".old" in p.name]
    assert not left, f"left behind: {left}"


@pytest.fixture
def earlier(tmp_path: Path, disk: Disk) -> Path:
    """An earlier output on the same disk, which no failure may touch."""
    d = disk.root / "earlier"
    d.mkdir()
    (d / "result.json").write_text('{"keep": true}\n')
    return d


# -- prepare -------------------------------------------------------------------------------


def test_prepare_full_disk_at_a_scan(disk: Disk, earlier: Path, fault_root, tmp_path: Path,
                                     unchanged) -> None:
    root = fault_root("")
    out = disk.root / "data"
    disk.fill(leave=64 * KB)
    with unchanged(earlier, root):
        r = run_cli("prepare", "--lidc-root", root, "--out", out, tmp_path=tmp_path)
    line = refused(r, "no space left on device", str(out / ".parts"), "prepare again")
    assert "scan-" in line
    no_temporaries(disk.root)
    assert not list(out.glob("*.h5")) and not (out / "manifest.json").exists()
    assert not list((out / ".parts").glob("scan-*.json")), "a scan that failed was recorded"


def test_prepare_full_disk_at_assembly_keeps_the_scans(disk: Disk, earlier: Path, fault_root,
                                                       tmp_path: Path, unchanged, monkeypatch) -> None:
    import lidcseg.data.prepare as prep

    root = fault_root("")
    out = disk.root / "data"
    disk.fill(leave=480 * KB)  # the scan's part fits, the split files do not
    with unchanged(earlier, root):
        r = run_cli("prepare", "--lidc-root", root, "--out", out, tmp_path=tmp_path)
    refused(r, f"{out}: no space left on device (needs about", "finished scans are kept")
    no_temporaries(disk.root)
    assert not list(out.glob("*.h5")) and not (out / "manifest.json").exists()
    records = list((out / ".parts").glob("scan-*.json"))
    assert len(records) == 1

    disk.free()

    def redo(*args: object) -> None:
        raise AssertionError("a finished scan was redone")

    monkeypatch.setattr(prep, "process_scan", redo)
    r = cli("prepare", "--lidc-root", root, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["total_crops"] > 0


def test_prepare_disk_filling_during_assembly(disk: Disk, fault_root, monkeypatch, unchanged) -> None:
    """The free-space check passes (another writer fills the disk meanwhile): the HDF5
    writer meets the full disk itself, and nothing is lost."""
    import lidcseg.data.prepare as prep
    from lidcseg.io.atomic import NoSpaceError

    root = fault_root("")
    out = disk.root / "data"
    disk.fill(leave=480 * KB)
    monkeypatch.setattr(prep, "check_free_space", lambda *a, **k: None)
    with pytest.raises(NoSpaceError) as e:
        prep.prepare(root, out, patients=[FAULT_PATIENT])
    assert e.value.path == out / "train.h5" and "no space left on device" in str(e.value)
    no_temporaries(disk.root)
    assert not list(out.glob("*.h5"))
    assert len(list((out / ".parts").glob("scan-*.h5"))) == 1


def test_prepare_overwrite_on_full_disk_keeps_the_old_dataset(disk: Disk, fault_root, tmp_path: Path,
                                                               unchanged) -> None:
    """``--overwrite`` replaces the old dataset only once the new one is assembled."""
    root = fault_root("")
    out = disk.root / "data"
    assert cli("prepare", "--lidc-root", root, "--out", out).exit_code == 0
    old_files = sorted(p.name for p in out.iterdir() if p.is_file())
    disk.fill(leave=64 * KB)
    with unchanged(*(out / n for n in old_files)):
        r = run_cli("prepare", "--lidc-root", root, "--out", out, "--seed", "7", "--overwrite",
                    tmp_path=tmp_path)
        refused(r, "no space left on device")
    no_temporaries(disk.root)


# -- import --------------------------------------------------------------------------------


def _pickle(path: Path, n_patients: int, per_patient: int) -> Path:
    from tests.test_releases import v1_entries, write_pickle

    return write_pickle(path, v1_entries(n_patients=n_patients, per_patient=per_patient))


def test_import_full_disk(disk: Disk, earlier: Path, tmp_path: Path, unchanged) -> None:
    big = _pickle(tmp_path / "big.pickle", 10, 4)  # about 1.6 MB of crops
    out = disk.root / "imported"
    disk.fill(leave=300 * KB)
    with unchanged(earlier, big):
        r = run_cli("import", "pytorch-pickle", big, "--out", out, tmp_path=tmp_path)
    refused(r, "no space left on device", str(out / "train.h5"))
    no_temporaries(disk.root)
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix in (".h5", ".json")
                                    and not p.name.startswith(".")]
    disk.free()
    r = cli("import", "pytorch-pickle", big, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "warnings" not in json.loads((out / "manifest.json").read_text())


def test_import_overwrite_on_full_disk_keeps_the_old_data_set(disk: Disk, tmp_path: Path,
                                                              unchanged) -> None:
    small = _pickle(tmp_path / "small.pickle", 3, 2)
    big = _pickle(tmp_path / "big.pickle", 10, 4)
    out = disk.root / "imported"
    assert cli("import", "pytorch-pickle", small, "--out", out).exit_code == 0
    disk.fill(leave=300 * KB)
    with unchanged(out):
        r = run_cli("import", "pytorch-pickle", big, "--out", out, "--overwrite", tmp_path=tmp_path)
    refused(r, "no space left on device", str(out / "train.h5"))
    no_temporaries(disk.root)


# -- scenes make ---------------------------------------------------------------------------


def test_scenes_make_full_disk(disk: Disk, earlier: Path, tmp_path: Path, unchanged) -> None:
    out = disk.root / "scenes"
    args = ["scenes", "make", "--out", out, "--n-train", 60, "--n-val", 10, "--n-test", 10]
    disk.fill(leave=100 * KB)
    with unchanged(earlier):
        r = run_cli(*args, tmp_path=tmp_path)
    refused(r, "no space left on device", str(out / "train.h5"))
    no_temporaries(disk.root)
    assert not list(out.glob("*.h5")) and not (out / "manifest.json").exists()
    disk.free()
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.h5")) == ["test.h5", "train.h5", "val.h5"]


# -- train ---------------------------------------------------------------------------------


def test_train_full_disk_before_any_checkpoint(disk: Disk, earlier: Path, disc_data: Path,
                                               unchanged) -> None:
    run = disk.root / "run"
    disk.fill(leave=96 * KB)  # the configs and metrics fit, no checkpoint does
    with unchanged(earlier, disc_data):
        r = cli("train", "--data", disc_data, "--out", run, "--steps", 2, *_TINY_TRAIN)
    refused_while_training(r, "no space left on device", str(run), "no checkpoint was written yet")
    no_temporaries(disk.root)
    assert not (run / "last").exists() and not (run / "best").exists()
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        json.loads(line)  # no torn line
    refused(cli("train", "--data", disc_data, "--out", run, "--resume", *_TINY_TRAIN),
            "nothing to resume")


def test_train_resume_on_full_disk_keeps_last_and_continues_once_freed(
        disk: Disk, disc_data: Path, unchanged) -> None:
    run = disk.root / "run"
    r = cli("train", "--data", disc_data, "--out", run, "--steps", 2, *_TINY_TRAIN)
    assert r.exit_code == 0, r.stderr
    disk.fill(leave=64 * KB)
    with unchanged(run / "last", run / "best"):
        r = cli("train", "--data", disc_data, "--out", run, "--steps", 4, "--resume", *_TINY_TRAIN)
    refused_while_training(r, "no space left on device", str(run), "last/ keeps step 2", "--resume")
    no_temporaries(disk.root)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)

    disk.free()
    r = cli("train", "--data", disc_data, "--out", run, "--steps", 4, "--resume", *_TINY_TRAIN)
    assert r.exit_code == 0, r.stderr
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 4
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(row["split"], row["step"]) for row in rows]
    assert len(keys) == len(set(keys)) and ("train", 4) in keys
    no_temporaries(disk.root)


def test_metrics_line_on_full_disk_is_whole_or_absent(disk: Disk) -> None:
    from lidcseg.io.atomic import NoSpaceError
    from lidcseg.training.run_state import append_jsonl

    path = disk.root / "metrics.jsonl"
    append_jsonl(path, {"split": "train", "step": 1})
    before = path.read_bytes()
    disk.fill(leave=0)
    with pytest.raises(NoSpaceError, match="no space left on device") as e:
        for step in range(2, 10_000):  # the page of metrics.jsonl fills up first
            append_jsonl(path, {"split": "train", "step": step, "pad": "x" * 200})
    assert e.value.path == path
    text = path.read_bytes()
    assert text.startswith(before) and text.endswith(b"\n")
    for line in text.decode().splitlines():
        json.loads(line)


def test_a_killed_checkpoint_swap_is_not_resumed_from(disc_data: Path, tmp_path: Path) -> None:
    """``.last.tmp`` of a kill during the checkpoint swap is never taken for ``last/``."""
    run = tmp_path / "run"
    assert cli("train", "--data", disc_data, "--out", run, "--steps", 2, *_TINY_TRAIN).exit_code == 0
    half = run / ".last.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100)  # half-written
    r = cli("train", "--data", disc_data, "--out", run, "--steps", 3, "--resume", *_TINY_TRAIN)
    assert r.exit_code == 0, r.stderr
    assert not half.exists()
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 3


# -- interrupted finalisation -----------------------------------------------------------------

_KILL_IN_ASSEMBLY = textwrap.dedent("""
    import os, signal, sys
    import lidcseg.data.prepare as prep

    class Killed(prep.CropWriter):
        def append(self, batch):
            super().append(batch)
            self._f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    prep.CropWriter = Killed
    prep.prepare(sys.argv[1], sys.argv[2])
""")


@pytest.mark.parametrize("where", ["killed", "beside-outputs"])
def test_interrupted_assembly_leaves_nothing_the_next_run_takes(where: str, fault_root,
                                                                tmp_path: Path) -> None:
    """A kill during prepare's final assembly leaves a temporary HDF5 (today in ``.parts``,
    in older versions beside the outputs); the next run removes it and names it."""
    root = fault_root("")
    out = tmp_path / "data"
    if where == "killed":
        p = subprocess.run([sys.executable, "-c", _KILL_IN_ASSEMBLY, str(root), str(out)],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == -signal.SIGKILL, p.stderr
        stale = [p for p in (out / ".parts").iterdir() if ".tmp" in p.name]
        assert [p.name.split(".")[1] for p in stale] == ["assembled-train"]
    else:
        assert cli("prepare", "--lidc-root", root, "--out", out).exit_code == 0
        (out / "manifest.json").unlink()  # the run did not finish
        stale = [out / ".train.k1ll3d_x.tmp.h5"]
        shutil.copyfile(out / "train.h5", stale[0])
        with open(stale[0], "r+b") as f:
            f.truncate(stale[0].stat().st_size // 2)  # cut short, as a kill leaves it
    assert not (out / "manifest.json").exists() and not (out / "train.h5.tmp").exists()

    r = cli("prepare", "--lidc-root", root, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert not any(p.exists() for p in stale)
    no_temporaries(out)
    manifest = json.loads((out / "manifest.json").read_text())
    said = [w for w in manifest["warnings"] if "interrupted run" in w["warning"]]
    assert [w["file"] for w in said] == [str(p) for p in stale]
    for p in stale:  # and the command says so
        assert f"warning: {p}: removed a temporary file left by an interrupted run" in r.stderr
    from lidcseg.data.store import CropStore

    with CropStore(out / "train.h5") as store:
        assert len(store) == manifest["counts"]["train"]["crops"] > 0


def test_interrupted_import_staging_is_removed_and_named(tmp_path: Path) -> None:
    small = _pickle(tmp_path / "small.pickle", 3, 2)
    out = tmp_path / "imported"
    assert cli("import", "pytorch-pickle", small, "--out", out).exit_code == 0
    stage = out / ".import-k1ll3d"
    stage.mkdir()
    (stage / "train.h5").write_bytes(b"\x89HDF\r\n\x1a\n")  # what a kill left
    r = cli("import", "pytorch-pickle", small, "--out", out, "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert not stage.exists()
    warnings = json.loads((out / "manifest.json").read_text())["warnings"]
    assert [w["file"] for w in warnings] == [str(stage)]


def test_interrupted_scenes_staging_is_removed_and_named(tmp_path: Path) -> None:
    out = tmp_path / "scenes"
    args = ["scenes", "make", "--out", out, "--n-train", 2, "--n-val", 1, "--n-test", 1]
    assert cli(*args).exit_code == 0
    stage = out / ".scenes-k1ll3d"
    stage.mkdir()
    (stage / "train.h5").write_bytes(b"junk")
    r = cli(*args, "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert not stage.exists()
    warnings = json.loads((out / "manifest.json").read_text())["warnings"]
    assert [w["file"] for w in warnings] == [str(stage)]


# -- the HDF5 writer, failing at every point (no tmpfs needed) ----------------------------------


def _write_crops_one_by_one(dest: Path) -> None:
    from lidcseg.data.store import CropWriter
    from tests.conftest import make_disc_crops

    batch = make_disc_crops(6)
    with CropWriter(dest, 180) as w:
        for i in range(len(batch)):
            w.append(type(batch)(batch.image[i:i + 1], batch.masks[i:i + 1],
                                 {k: v[i:i + 1] for k, v in batch.meta.items()}))


@pytest.mark.parametrize("where", ["header", "first chunk", "middle", "closing metadata", "last write"])
def test_hdf5_writer_survives_a_write_failing_anywhere(where: str, tmp_path: Path, monkeypatch) -> None:
    """ENOSPC at any point of writing a split file (HDF5 segfaulted when closing after a
    failed write): one NoSpaceError naming the file, the previous file kept, no temporary
    left, no crash."""
    from lidcseg.io.atomic import NoSpaceError

    real = os.pwrite
    sizes: list[int] = []

    def counting(fd: int, data, offset: int) -> int:  # noqa: ANN001
        sizes.append(len(memoryview(data).cast("B")))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting)
    _write_crops_one_by_one(tmp_path / "dry-run.h5")  # how many bytes, in how many writes
    (tmp_path / "dry-run.h5").unlink()
    # The write that fails (by its number: the bytes written vary by a few between runs).
    fail_at = {"header": 0, "first chunk": 3, "middle": len(sizes) // 2,
               "closing metadata": len(sizes) - 8, "last write": len(sizes) - 1}[where]
    calls = {"n": 0}

    def failing(fd: int, data, offset: int) -> int:  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] > fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    dest = tmp_path / "train.h5"
    dest.write_bytes(b"the previous file")
    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(NoSpaceError, match="no space left on device") as e:
        _write_crops_one_by_one(dest)
    assert e.value.path == dest
    assert dest.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.h5"]
