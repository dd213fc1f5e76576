"""The bad-input suite: every command refuses hostile or broken input in one line.

Each case asserts, through :func:`refused`: a non-zero exit (2 for bad input), exactly
one line on stderr that starts with ``error:``, names the file or option and is not the
safety net's ``internal error``, no traceback, and (with :func:`tree_state`) that what
was on disk before is unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lidcseg_cli.main import app

runner = CliRunner()


def cli(*args: object):
    """Run ``lidcseg ARGS`` in-process (``typer.testing.CliRunner``, stderr kept apart)."""
    return runner.invoke(app, [str(a) for a in args])


def refused(result, *needles: str, code: int = 2) -> str:
    """Assert a one-line refusal naming ``needles``; returns the line."""
    err = result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"unhandled {result.exception!r}\n{err}")
    assert result.exit_code == code, f"exit {result.exit_code}, stderr:\n{err}\nstdout:\n{result.stdout}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("error: ") and not line.startswith("error: internal error"), line
    assert "Traceback" not in err + result.stdout
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def tree_state(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) with its SHA-256: compare before and after."""
    root = Path(root)
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def unchanged():
    """``with unchanged(path, ...):`` asserts that nothing under the paths changed in the block."""
    from contextlib import contextmanager

    @contextmanager
    def check(*paths: Path):
        before = [tree_state(p) for p in paths]
        yield
        after = [tree_state(p) for p in paths]
        for p, b, a in zip(paths, before, after, strict=True):
            assert a == b, f"{p} changed: {sorted(set(a.items()) ^ set(b.items()))[:5]}"

    return check
