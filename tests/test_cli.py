"""The command line: --help everywhere, --version, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lidcseg import __version__
from lidcseg_cli.main import app

runner = CliRunner()


def _commands(typer_app) -> list[list[str]]:
    import typer.main

    group = typer.main.get_command(typer_app)
    out = [[]]
    for name, cmd in group.commands.items():
        out.append([name])
        for sub in getattr(cmd, "commands", {}):
            out.append([name, sub])
    return out


@pytest.mark.parametrize("path", _commands(app), ids=lambda p: " ".join(p) or "lidcseg")
def test_help_everywhere(path: list[str]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_train_help_lists_every_model_and_preset() -> None:
    from lidcseg.models.registry import MODEL_SPECS
    from lidcseg.presets import PRESETS

    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    lines = [ln.strip() for ln in result.output.splitlines()]
    for name, spec in MODEL_SPECS.items():
        row = next((ln for ln in lines if ln.split(" ")[0] == name), None)
        assert row is not None, f"model {name} not listed"
        assert spec.summary.split(" ")[0] in row  # the summary starts on the name's line
    for name in PRESETS:
        assert any(ln.split(" ")[0] == name for ln in lines), f"preset {name} not listed"


def test_help_imports_no_torch() -> None:
    """``lidcseg --help`` and ``lidcseg train --help`` (which lists the models) stay torch-free."""
    code = (
        "import sys; from typer.testing import CliRunner; from lidcseg_cli.main import app\n"
        "for args in (['--help'], ['train', '--help'], ['import', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_progress_bar_started_late_or_never() -> None:
    from lidcseg_cli._common import progress_bar, stage_progress

    with progress_bar("train", "{task.fields[loss]}", total=3, start=False, loss="") as bar:
        assert not bar.started  # an input error here would print no empty bar
    with progress_bar("train", "{task.fields[loss]}", total=3, start=False, loss="") as bar:
        bar.start()
        bar.start()
        bar.update(completed=2, loss="0.5")
        assert bar.started and bar.elapsed > 0
    with stage_progress() as update:
        update("stage", 0, 0)
        update("stage", 1, 2)


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"lidcseg {__version__}"


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_prepare_missing_root(tmp_path: Path) -> None:
    _one_line_error(
        runner.invoke(app, ["prepare", "--lidc-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]),
        "nope", "does not exist",
    )
    assert not (tmp_path / "o").exists()


def test_prepare_bad_split(tmp_path: Path) -> None:
    _one_line_error(
        runner.invoke(app, ["prepare", "--lidc-root", str(tmp_path), "--out", str(tmp_path / "o"), "--split", "1,2"]),
        "--split",
    )


def test_phantom_bad_fault_and_patient(tmp_path: Path) -> None:
    _one_line_error(
        runner.invoke(app, ["phantom", "--out", str(tmp_path), "--patients", "LIDC-IDRI-0957", "--fault", "x"]),
        "PATIENT:FAULT",
    )
    _one_line_error(
        runner.invoke(app, ["phantom", "--out", str(tmp_path), "--patients", "LIDC-IDRI-9999"]),
        "LIDC-IDRI-9999",
    )


def test_prepare_strict_truncated_is_one_line(fault_root, tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = runner.invoke(
        app, ["prepare", "--lidc-root", str(fault_root("truncated")), "--out", str(out), "--strict"]
    )
    _one_line_error(result, "truncated DICOM file", ".dcm")
    assert not list(out.glob("*.h5")) and not (out / "manifest.json").exists()


def test_phantom_then_prepare(tmp_path: Path) -> None:
    lidc, data = tmp_path / "lidc", tmp_path / "data"
    r = runner.invoke(app, ["phantom", "--out", str(lidc), "--patients", "LIDC-IDRI-0957", "--noise", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["prepare", "--lidc-root", str(lidc), "--out", str(data)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((data / "manifest.json").read_text())
    assert f"{manifest['total_crops']} crops" in r.output
    assert manifest["total_crops"] > 0


@pytest.mark.slow
def test_the_wheel_holds_every_package(tmp_path: Path) -> None:
    """A built wheel holds every package (each folder of lidcseg/ with an __init__.py), the CLI and py.typed."""
    import shutil
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(root / name, src / name)
    for name in ("lidcseg", "cli"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("lidcseg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(root).as_posix() for p in (root / "lidcseg").rglob("__init__.py")}
    assert packages and {f"{p}/__init__.py" for p in packages} <= names
    assert {"lidcseg_cli/__init__.py", "lidcseg_cli/main.py", "lidcseg/py.typed"} <= names

def test_progress_labels_are_plain_text() -> None:
    """Stage names and fields are shown as written: no rich markup, no emoji codes."""
    from lidcseg_cli._common import progress_bar

    with progress_bar("flip:train:probunet [x]", "{task.fields[model]}", total=1,
                      model=":train:") as bar:
        progress = bar._progress
        task = progress.tasks[0]
        shown = [col.render(task).plain for col in progress.columns[:1] + progress.columns[3:4]]
    assert shown == ["flip:train:probunet [x]", ":train:"]
