"""Atomic writes: the file appears whole or not at all, with the mode open() would give it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lidcseg.io.atomic import atomic_path, new_file_mode, write_json_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        assert new_file_mode() == 0o666 & ~umask
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
        write_json_atomic(tmp_path / "b.json", {"a": 1})
        plain = tmp_path / "c.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("a.txt", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "d.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("new")
        raise RuntimeError("boom")
    assert dest.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["d.txt"]
