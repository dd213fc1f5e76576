"""The command line: --help everywhere, --version, and one-line errors without tracebacks."""

from __future__ import annotations

import json
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
