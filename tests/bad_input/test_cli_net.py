"""The CLI's safety net and usage errors: one line, a log file for bugs, --debug for tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bad_input.conftest import cli, refused


@pytest.mark.parametrize(("args", "needle"), [
    (["train", "--data", "d", "--out", "o", "--steps", "many"], "--steps"),
    (["sample"], "scan"),
    (["evaluate", "--data", "d", "--run", "r", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["no-such-command"], "no-such-command"),
    (["prepare", "--lidc-root", "x", "--no-such-option"], "--no-such-option"),
])
def test_usage_errors_are_one_line(args: list[str], needle: str) -> None:
    refused(cli(*args), needle)


def _crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `lidcseg phantom` hit a bug (an exception no check expects)."""
    import lidcseg.lidc.phantom as phantom

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(phantom, "make_phantom", boom)


def test_a_bug_is_one_line_with_a_log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _crash(monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LIDCSEG_DEBUG", raising=False)
    result = cli("phantom", "--out", tmp_path / "lidc", "--patients", "LIDC-IDRI-0078")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 3 and len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: internal error: ZeroDivisionError: a bug; details in ")
    log = Path(line.rsplit("details in ", 1)[1])
    assert log.parent == tmp_path / "cache" / "lidcseg" / "errors" and log.is_file()
    text = log.read_text()
    assert "Traceback" in text and "ZeroDivisionError: a bug" in text and "phantom --out" in text
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["--debug", "LIDCSEG_DEBUG"])
def test_debug_shows_the_traceback(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _crash(monkeypatch)
    args = ["phantom", "--out", tmp_path / "lidc", "--patients", "LIDC-IDRI-0078"]
    if how == "--debug":
        args = ["--debug", *args]
    else:
        monkeypatch.setenv("LIDCSEG_DEBUG", "1")
    result = cli(*args)
    assert isinstance(result.exception, ZeroDivisionError)  # re-raised, so Python prints the traceback


def test_the_installed_command_exits_3_on_a_bug(tmp_path: Path) -> None:
    """Through a real process: no traceback on stderr, the log file holds it."""
    code = ("import sys, lidcseg.lidc.phantom as p\n"
            "p.make_phantom = lambda *a, **k: 1 / 0\n"
            "from lidcseg_cli.main import app\n"
            "sys.argv = ['lidcseg', 'phantom', '--out', sys.argv[1], '--patients', 'LIDC-IDRI-0078']\n"
            "app()\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("LIDCSEG_DEBUG", None)
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 3, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "internal error: ZeroDivisionError" in res.stderr
