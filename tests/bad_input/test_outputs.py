"""Output folders: --overwrite never deletes what the command did not write (lidcseg.io.outputs).

Every command checks its output with the one helper: only a folder the same command wrote
(its marker, or an older version's format file) is replaced or written into, an empty
folder always may be, never a folder that is, holds or is inside an input, and never a
path under a file. Each refusal is one line naming the folder; the victim is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lidcseg.errors import LidcsegError
from lidcseg.io.outputs import MARKER, OutputKind, check_output_folder, has_format, replaced_folder
from tests.bad_input.conftest import cli, refused

NOT_SAMPLE = "not written by `lidcseg sample`"


# -- small victims: nothing here is ever read, the refusal comes first --------------------------


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    """A DICOM series folder ``data/patient/series/`` (never read: the refusal comes first)."""
    series = tmp_path / "data" / "patient" / "series"
    series.mkdir(parents=True)
    for i in range(3):
        (series / f"1-{i:03d}.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes([i]))
    (series.parent / "notes.txt").write_text("the radiologist's notes")
    return series


def make_run(root: Path) -> Path:
    """A folder that looks like a `lidcseg train` run (config, metrics, a checkpoint)."""
    (root / "best").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model": {"name": "probunet"}, "train": {}}))
    (root / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n')
    (root / "best" / "model.safetensors").write_bytes(b"weights")
    return root


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "runs" / "probunet")


def foreign(path: Path) -> Path:
    """A folder of somebody else's files."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "figures").mkdir(exist_ok=True)
    (path / "figures" / "fig1.png").write_bytes(b"\x89PNG\r\n\x1a\n...")
    return path


def sample(scan: Path, run: Path, out: Path, *extra: object):
    return cli("sample", scan, "--run", run, "--out", out, "--at", "0,0,0", "-n", 1, *extra)


# -- sample: never over its inputs, never over someone else's folder ---------------------------


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize(("where", "needle"), [
    ("series-folder", "is the input"),
    ("series-parent", "contains the input"),
    ("inside-series", "is inside the input"),
    ("the-run", "is the input"),
    ("inside-run", "is inside the input"),
    ("nifti-folder", "contains the input"),
])
def test_sample_never_writes_over_or_inside_an_input(
    where: str, needle: str, overwrite: bool, scan: Path, run: Path, tmp_path: Path, unchanged
) -> None:
    if where == "nifti-folder":
        scan = scan.parent / "scan.nii.gz"
        scan.write_bytes(b"\x1f\x8b not really a NIfTI")
    out = {
        "series-folder": scan,
        "series-parent": scan.parent,
        "inside-series": scan / "hypotheses",
        "the-run": run,
        "inside-run": run / "samples",
        "nifti-folder": scan.parent,
    }[where]
    with unchanged(tmp_path):
        line = refused(sample(scan, run, out, *(["--overwrite"] if overwrite else [])), str(out), needle)
    assert str(scan) in line or str(run) in line  # names the input too
    assert not (scan / "hypotheses").exists() and not (run / "samples").exists()


def test_sample_input_reached_through_a_symlink(scan: Path, run: Path, tmp_path: Path, unchanged) -> None:
    link = tmp_path / "link"
    link.symlink_to(scan.parent, target_is_directory=True)  # the folder around the series
    with unchanged(scan.parent):
        refused(sample(scan, run, link, "--overwrite"), str(link), "contains the input")


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("victim", ["foreign-files", "another-model-run", "an-evaluation-report"])
def test_sample_never_replaces_a_folder_it_did_not_write(
    victim: str, overwrite: bool, scan: Path, run: Path, tmp_path: Path, unchanged
) -> None:
    out = tmp_path / "victim"
    if victim == "foreign-files":
        foreign(out)
    elif victim == "another-model-run":
        make_run(out)
    else:
        out.mkdir()
        (out / "summary.json").write_text(json.dumps({"format": "lidcseg-evaluation"}))
        (out / MARKER).write_text(json.dumps({"command": "evaluate", "version": 1}))
    with unchanged(out):
        line = refused(sample(scan, run, out, *(["--overwrite"] if overwrite else [])), str(out), NOT_SAMPLE)
    assert "--overwrite" not in line.split(NOT_SAMPLE)[1]  # it would not help: not suggested
    if victim == "an-evaluation-report":
        assert "`lidcseg evaluate`" in line


@pytest.mark.parametrize(("how", "needle"), [
    ("file", "exists and is not a folder"),
    ("under-a-file", "is a file, not a folder"),
    ("deep-under-a-file", "is a file, not a folder"),
])
def test_sample_output_that_cannot_be_a_folder(
    how: str, needle: str, scan: Path, run: Path, tmp_path: Path, unchanged
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = {"file": blocker, "under-a-file": blocker / "out", "deep-under-a-file": blocker / "a" / "b"}[how]
    with unchanged(tmp_path):
        refused(sample(scan, run, out, "--overwrite"), str(out), needle)


# -- train, prepare, import, phantom, scenes ---------------------------------------------------


@pytest.mark.parametrize(("what", "needle"), [
    ("foreign", "is not a lidcseg run (not written by `lidcseg train`)"),
    ("the-data", "is the input"),
    ("around-the-data", "contains the input"),
])
def test_train_overwrite_refuses_what_is_not_a_run(
    what: str, needle: str, disc_data: Path, tmp_path: Path, unchanged
) -> None:
    if what == "foreign":
        out, data = foreign(tmp_path / "work"), disc_data
    else:
        data = tmp_path / "project" / "data"
        data.mkdir(parents=True)
        for name in ("train.h5", "val.h5", "test.h5"):
            (data / name).write_bytes((disc_data / name).read_bytes())
        out = data if what == "the-data" else data.parent
    with unchanged(out):
        refused(cli("train", "--data", data, "--out", out, "--overwrite", "--steps", 1), str(out), needle)


def fake_lidc_root(root: Path) -> Path:
    """A LIDC-IDRI download as far as prepare looks before writing (one known patient folder)."""
    series = root / "LIDC-IDRI-0078" / "1.2.3" / "4.5.6"
    series.mkdir(parents=True)
    (series / "1-001.dcm").write_bytes(b"\0" * 128 + b"DICM real pixels")
    return root


@pytest.mark.parametrize(("where", "needle"), [
    ("root", "is the input"),
    ("inside", "is inside the input"),
    ("patient-folder", "is inside the input"),
])
def test_prepare_never_writes_into_the_lidc_root(where: str, needle: str, tmp_path: Path, unchanged) -> None:
    root = fake_lidc_root(tmp_path / "LIDC")
    out = {"root": root, "inside": root / "data", "patient-folder": root / "LIDC-IDRI-0078"}[where]
    with unchanged(root):
        refused(cli("prepare", "--lidc-root", root, "--out", out, "--overwrite"), str(out), needle)
    assert not (root / "data").exists()


def test_prepare_refuses_a_foreign_folder(tmp_path: Path, unchanged) -> None:
    root = fake_lidc_root(tmp_path / "LIDC")
    out = foreign(tmp_path / "work")
    with unchanged(tmp_path):
        refused(cli("prepare", "--lidc-root", root, "--out", out, "--overwrite"), str(out),
                "not written by `lidcseg prepare`")


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_phantom_never_writes_into_a_real_download(overwrite: bool, tmp_path: Path, unchanged) -> None:
    root = fake_lidc_root(tmp_path / "LIDC")  # no marker: a real download
    args = ["phantom", "--out", root, "--patients", "LIDC-IDRI-0078"] + (["--overwrite"] if overwrite else [])
    with unchanged(tmp_path):
        refused(cli(*args), str(root), "not written by `lidcseg phantom`")


def _fake_scan_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make phantom scans cheap: one small file per scan (the folder logic is what is tested)."""
    import lidcseg.lidc.phantom as phantom

    def write(scan, out, **kwargs):  # noqa: ANN001, ANN003, ANN202
        series = Path(out) / scan.patient_id / "study" / "series"
        series.mkdir(parents=True, exist_ok=True)
        (series / "1-001.dcm").write_bytes(b"phantom")
        return phantom.PhantomScan(scan.patient_id, int(scan.id), series, 1, ())

    monkeypatch.setattr(phantom, "write_phantom_scan", write)


def test_phantom_adds_to_and_replaces_only_its_own_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_scan_writer(monkeypatch)
    out = tmp_path / "lidc"
    out.mkdir()  # an empty folder may be used
    assert cli("phantom", "--out", out, "--patients", "LIDC-IDRI-0078").exit_code == 0
    assert cli("phantom", "--out", out, "--patients", "LIDC-IDRI-0957").exit_code == 0  # adds to it
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "LIDC-IDRI-0078", "LIDC-IDRI-0957"]
    result = cli("phantom", "--out", out, "--patients", "LIDC-IDRI-0957", "--overwrite")  # replaces it
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "LIDC-IDRI-0957"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lidc"]  # no temporary left


def test_a_phantom_tree_from_before_the_marker_is_still_ours(fault_root, tmp_path: Path, unchanged) -> None:
    """A tree of phantom DICOM files only (no marker: an older lidcseg) may be added to; one
    file of anything else makes the tree foreign."""
    import shutil

    from lidcseg.lidc.phantom import PHANTOM_OUTPUT

    old = tmp_path / "old"
    shutil.copytree(fault_root(""), old, ignore=shutil.ignore_patterns(MARKER))
    assert not (old / MARKER).exists() and PHANTOM_OUTPUT.owns(old)
    (next(old.rglob("*.dcm")).parent / "notes.txt").write_text("a radiologist's notes")
    assert not PHANTOM_OUTPUT.owns(old)
    with unchanged(old):
        refused(cli("phantom", "--out", old, "--patients", "LIDC-IDRI-0078"), "not written by `lidcseg phantom`")


@pytest.mark.parametrize(("victim", "needle"), [
    ("foreign", "not written by `lidcseg import`"),
    ("prepared", "not written by `lidcseg import`"),
    ("around-the-pickle", "contains the input"),
])
def test_import_refuses_a_folder_it_did_not_write(victim: str, needle: str, tmp_path: Path, unchanged) -> None:
    pickle = tmp_path / "release" / "data_lidc.pickle"
    pickle.parent.mkdir()
    pickle.write_bytes(b"\x80\x04N.")
    if victim == "foreign":
        out = foreign(tmp_path / "work")
    elif victim == "prepared":
        out = tmp_path / "data"
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"format": "lidcseg-prepared"}))
        (out / "train.h5").write_bytes(b"crops")
    else:
        out = pickle.parent
    with unchanged(tmp_path):
        refused(cli("import", "pytorch-pickle", pickle, "--out", out, "--overwrite"), str(out), needle)


def test_scenes_overwrite_replaces_its_own_folder_only(tmp_path: Path, unchanged) -> None:
    make = ["scenes", "make", "--n-train", 1, "--n-val", 1, "--n-test", 1]
    out = tmp_path / "flips"
    assert cli(*make, "--out", out).exit_code == 0
    refused(cli(*make, "--out", out), str(out), "--overwrite")
    result = cli(*make, "--out", out, "--overwrite", "--seed", 3)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3
    assert json.loads((out / MARKER).read_text()) == {"command": "scenes make", "version": 1}
    victim = foreign(tmp_path / "work")
    with unchanged(victim):
        refused(cli(*make, "--out", victim, "--overwrite"), str(victim), "not written by `lidcseg scenes make`")


# -- the reports: evaluate, ambiguity, calibration, latent --------------------------------------


def report_args(command: str, data: Path, run: Path, out: Path) -> list[object]:
    return [command, "--data", data, "--run", run, "--out", out]


@pytest.mark.parametrize("command", ["evaluate", "ambiguity", "calibration"])
@pytest.mark.parametrize(("how", "needle"), [
    ("file", "exists and is not a folder"),
    ("foreign", "was not written by `lidcseg {command}`"),
    ("under-a-file", "is a file, not a folder"),
    ("the-data", "is the input"),
])
def test_report_folder_refusals(
    command: str, how: str, needle: str, disc_data: Path, run: Path, tmp_path: Path, unchanged
) -> None:
    blocker = tmp_path / "report.md"
    blocker.write_text("my notes")
    out = {"file": blocker, "foreign": foreign(tmp_path / "work"), "under-a-file": blocker / "report",
           "the-data": disc_data}[how]
    with unchanged(tmp_path, disc_data):
        refused(cli(*report_args(command, disc_data, run, out)), str(out), needle.format(command=command))


def test_latent_png_refusals(disc_data: Path, run: Path, tmp_path: Path, unchanged) -> None:
    blocker = tmp_path / "figures"
    blocker.write_text("a file")
    base = ["latent", "--run", run, "--data", disc_data, "--index", 0, "--out"]
    with unchanged(tmp_path, disc_data):
        refused(cli(*base, blocker / "latent.png"), str(blocker / "latent.png"), "is a file, not a folder")
        refused(cli(*base, blocker), str(blocker), "exists and is not a PNG")
        refused(cli(*base, disc_data / "test.h5"), "is inside the input")
        folder = tmp_path / "figs"
        folder.mkdir()
        refused(cli(*base, folder), str(folder), "is a folder")


# -- the helper itself: what counts as ours ----------------------------------------------------


KIND = OutputKind("sample", legacy=has_format("summary.json", format="lidcseg-sample"))


def test_own_output_of_any_version_and_empty_folders_may_be_replaced(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with replaced_folder(empty, KIND) as tmp:  # an empty folder needs no --overwrite
        (tmp / "a.txt").write_text("1")
    old = tmp_path / "old"  # written before the marker existed: its format file counts
    old.mkdir()
    (old / "summary.json").write_text(json.dumps({"format": "lidcseg-sample", "version": 1}))
    with pytest.raises(LidcsegError, match="pass --overwrite"):
        check_output_folder(old, KIND, replace=True)
    for out in (empty, old):
        with replaced_folder(out, KIND, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("2")
        assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "old"]


@pytest.mark.parametrize("marker", [
    "{not json", json.dumps(["sample"]), json.dumps({"command": "train", "version": 1}),
    json.dumps({"command": 7}),
])
def test_a_damaged_or_other_marker_is_not_ours(marker: str, tmp_path: Path, unchanged) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(marker)
    (out / "data.bin").write_bytes(b"x")
    with unchanged(out), pytest.raises(LidcsegError, match="not written by `lidcseg sample`"):
        with replaced_folder(out, KIND, overwrite=True):
            pass
