"""Where a command may write: the one check of every output folder (and output file).

Every command that writes a folder checks it here, with the same rules:

1. **Only our own folder.** A command writes into (or, with ``--overwrite``, replaces) only
   a folder that it wrote itself: one holding the marker :data:`MARKER`
   (``{"command": ..., "version": 1}``, written into every output folder), or the format
   file that older versions already wrote (:attr:`OutputKind.legacy`, e.g. sample's
   ``summary.json`` of format ``lidcseg-sample``). An empty folder may always be used;
   any other folder is refused, with or without ``--overwrite``.
2. **Never over an input.** A folder that is, contains or is inside one of the command's
   inputs (symlinks resolved) is refused: ``--out`` set to the scan's folder, its parent
   or the ``--run`` would otherwise delete them.
3. **Folders where folders can be.** An output that exists as a file, or whose parent (or
   any ancestor) is a file, is refused before anything is written.

``--overwrite`` therefore never deletes what the command did not write. Every refusal is
one :class:`~lidcseg.errors.LidcsegError` line naming the folder. This module knows files
only (it never imports models, lidc or data): each command describes its own output with
an :class:`OutputKind`.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import atomic_dir, write_json_atomic
from lidcseg.io.jsonfile import read_json_object

#: The marker every command writes into its output folder.
MARKER = ".lidcseg-output.json"
MARKER_VERSION = 1
#: The first bytes of a PNG file.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PathLike = str | Path


class OutputState(enum.Enum):
    """What :func:`check_output_folder` found at the output path."""

    NEW = "new"  #: nothing there yet
    EMPTY = "empty"  #: an empty folder
    OURS = "ours"  #: a folder this command wrote


@dataclass(frozen=True)
class OutputKind:
    """What one command writes, so that its output folder can be recognised as its own.

    Attributes:
        command: the command as typed after ``lidcseg`` (``sample``, ``scenes make``); it
            is recorded in the marker and named in refusals.
        legacy: recognises a folder written before the marker existed, from the format
            file that version wrote (see :func:`has_format`); None: the marker only.
        noun: what the folder is called in messages (``output folder``, ``run directory``).
        foreign: how a folder that is not ours is described; default ``was not written by
            `lidcseg <command>```.
    """

    command: str
    legacy: Callable[[Path], bool] | None = None
    noun: str = "output folder"
    foreign: str = ""

    def owns(self, folder: Path) -> bool:
        """Whether ``folder`` holds this command's marker or an older version's format file."""
        if written_by(folder) == self.command:
            return True
        if self.legacy is None:
            return False
        try:
            return bool(self.legacy(folder))
        except OSError:
            return False


def written_by(folder: Path) -> str | None:
    """The command recorded in ``folder``'s marker, or None (no marker, or a damaged one)."""
    data = read_json_object(folder / MARKER, 64 * 2**10)
    command = None if data is None else data.get("command")
    return command if isinstance(command, str) else None


def has_format(name: str, **fields: Any) -> Callable[[Path], bool]:
    """A :attr:`OutputKind.legacy` check: ``folder/name`` is a JSON object with these ``fields``.

    A field given as ``...`` only has to be present. With no fields, any JSON object counts.

    Example:
        >>> kind = OutputKind("sample", legacy=has_format("summary.json", format="lidcseg-sample"))
    """

    def check(folder: Path) -> bool:
        data = read_json_object(folder / name)
        return data is not None and all(
            key in data and (want is ... or data[key] == want) for key, want in fields.items()
        )

    return check


def mark_output(folder: PathLike, kind: OutputKind) -> None:
    """Write the marker of ``kind.command`` into ``folder`` (which must exist)."""
    write_json_atomic(Path(folder) / MARKER, {"command": kind.command, "version": MARKER_VERSION})


def claim_output(folder: PathLike, kind: OutputKind) -> Path:
    """Create ``folder`` if needed and mark it as ``kind``'s, before writing into it.

    Call it after :func:`check_output_folder`, when the command starts writing.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if written_by(folder) != kind.command:
        mark_output(folder, kind)
    return folder


def open_output_folder(out: PathLike, kind: OutputKind, *, inputs: Iterable[PathLike | None] = ()) -> Path:
    """Check ``out`` for a command that writes files into it (:func:`check_output_folder`),
    then create and mark it (:func:`claim_output`). Returns ``out`` as a :class:`Path`."""
    check_output_folder(out, kind, inputs=inputs)
    return claim_output(out, kind)


def check_apart(out: PathLike, inputs: Iterable[PathLike | None]) -> None:
    """Refuse an output that is, contains or is inside one of ``inputs`` (symlinks resolved).

    Raises:
        LidcsegError: naming the output and the input.
    """
    out = Path(out)
    target = _resolve(out)
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = _resolve(Path(given))
        if target == source:
            why = f"is the input {given}"
        elif source in target.parents:
            why = f"is inside the input {given}"
        elif target in source.parents:
            why = f"contains the input {given}"
        else:
            continue
        raise LidcsegError(f"{why}; refusing to write there (choose an --out apart from every input)", out)


def _resolve(path: Path) -> Path:
    """``path`` with symbolic links resolved (as far as they resolve: a loop stays as it is)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def check_parents(out: PathLike) -> None:
    """Refuse an output whose parent, or any ancestor, exists and is not a folder."""
    out = Path(out)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LidcsegError(f"cannot be created: {parent} is a file, not a folder", out)
            return
        if parent.is_symlink():  # a dangling link: mkdir would fail on it
            raise LidcsegError(f"cannot be created: {parent} is a broken symbolic link", out)


def check_output_folder(
    out: PathLike,
    kind: OutputKind,
    *,
    inputs: Iterable[PathLike | None] = (),
    replace: bool = False,
    overwrite: bool = False,
) -> OutputState:
    """Check that ``kind.command`` may write the folder ``out`` (module docstring: rules 1-3).

    Args:
        out: the output folder.
        kind: the command's output.
        inputs: the command's inputs (files or folders; None entries are skipped).
        replace: the command replaces the folder whole: an existing folder of ours then
            needs ``overwrite``. Otherwise the command writes into it, which is allowed.
        overwrite: ``--overwrite`` was given.

    Returns:
        Whether the folder is new, empty, or ours.

    Raises:
        LidcsegError: one line naming the folder: an input inside or around it, a file in
            the way, a folder that is not ours, or ours without ``overwrite`` (``replace``).
    """
    out = Path(out)
    check_apart(out, inputs)
    check_parents(out)
    if not out.exists():
        if out.is_symlink():
            raise LidcsegError(f"{kind.noun} is a broken symbolic link", out)
        return OutputState.NEW
    if not out.is_dir():
        raise LidcsegError(f"{kind.noun} exists and is not a folder", out)
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise LidcsegError(f"cannot read the {kind.noun} ({e.strerror or e})", out) from None
    if empty:
        return OutputState.EMPTY
    verb = "replace" if replace or overwrite else "write into"
    if not kind.owns(out):
        other = written_by(out)
        why = kind.foreign or f"was not written by `lidcseg {kind.command}`"
        if other is not None:
            why += f" (it holds the output of `lidcseg {other}`)"
        raise LidcsegError(f"{kind.noun} is not empty and {why}; refusing to {verb} it (choose another --out)", out)
    if replace and not overwrite:
        raise LidcsegError(f"{kind.noun} exists; pass --overwrite to replace it", out)
    return OutputState.OURS


@contextlib.contextmanager
def replaced_folder(
    out: PathLike,
    kind: OutputKind,
    *,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out``; on success it is marked and becomes ``out``.

    ``out`` is checked (:func:`check_output_folder` with ``replace``) before and again just
    before the swap of :func:`lidcseg.io.atomic.atomic_dir`: a folder that appeared
    meanwhile is kept and ours is dropped. On any error ``out`` is untouched.
    """
    inputs = [p for p in inputs if p is not None]
    out = Path(os.path.abspath(out))  # "." and "x/.." have no name to put a temporary beside
    check_output_folder(out, kind, inputs=inputs, replace=True, overwrite=overwrite)
    with atomic_dir(out) as tmp:
        yield tmp
        mark_output(tmp, kind)
        check_output_folder(out, kind, inputs=inputs, replace=True, overwrite=overwrite)


def check_output_file(
    out: PathLike,
    *,
    inputs: Iterable[PathLike | None] = (),
    signature: bytes = PNG_SIGNATURE,
    what: str = "PNG",
) -> Path:
    """Check that the file ``out`` may be written: apart from the inputs, under a folder,
    and, when it exists, a file of the same type (its first bytes are ``signature``).

    Raises:
        LidcsegError: one line naming the file.
    """
    out = Path(out)
    check_apart(out, inputs)
    check_parents(out)
    if out.is_dir():
        raise LidcsegError(f"is a folder; --out names the {what} file to write", out)
    if out.exists() or out.is_symlink():
        try:
            with out.open("rb") as f:
                head = f.read(len(signature))
        except OSError as e:
            raise LidcsegError(f"cannot read the existing file ({e.strerror or e})", out) from None
        if head != signature:
            raise LidcsegError(f"exists and is not a {what}; refusing to replace it (choose another --out)", out)
    return out
