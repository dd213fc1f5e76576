"""Write files so that a crash or a full disk never leaves a partial output behind.

Every output is written to a temporary file in the destination folder and then
renamed into place with :func:`os.replace`, which is atomic on POSIX.

A full disk (ENOSPC, or EDQUOT for a quota) while writing becomes a
:class:`NoSpaceError` naming the destination (:func:`atomic_path`, :func:`atomic_dir`);
the temporary file is removed, so the destination keeps its previous content.
:class:`LatchedFile` is the file to hand to writers that cannot survive a failed
write (HDF5), and :func:`check_free_space` refuses a write that cannot fit before it starts.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lidcseg.errors import LidcsegError

#: What a full-disk error tells the user to do, unless the caller knows better.
RETRY_HINT = "free some space and run again"
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: How other libraries spell a full disk in the errors they raise (HDF5's RuntimeError,
#: safetensors' SafetensorError) without an errno attribute.
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "errno = 28")


class NoSpaceError(LidcsegError):
    """The disk (or the user's quota) filled up while writing ``path``.

    Raised after the partial output was removed: what was there before is unchanged.
    """

    def __reduce__(self) -> tuple[Any, ...]:  # keep the path across processes (prepare's workers)
        return type(self), (self.message, self.path)

    def with_hint(self, hint: str | None = None, path: str | Path | None = None) -> NoSpaceError:
        """The same error with another recovery ``hint`` (the text after the first ``;``)
        and/or naming another ``path`` (e.g. the output instead of its temporary file)."""
        head, _, old = self.message.partition("; ")
        return NoSpaceError(f"{head}; {hint or old or RETRY_HINT}", self.path if path is None else path)

    def moved(self, tmp: str | Path, final: str | Path) -> NoSpaceError:
        """The same error naming ``final`` (or the file under it) instead of the temporary
        file or staging folder ``tmp`` (or the file under it); itself if it names neither."""
        if self.path is None or not self.path.is_relative_to(tmp):
            return self
        rel = self.path.relative_to(tmp)
        return self.with_hint(path=Path(final) / rel if str(rel) != "." else Path(final))


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` says that the disk or the quota is full (ENOSPC/EDQUOT), whatever raised it."""
    if isinstance(exc, NoSpaceError):
        return True
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
        return True
    text = str(exc).lower()
    return any(t in text for t in _NO_SPACE_TEXT)


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def no_space(path: str | Path, hint: str = RETRY_HINT, need: int | None = None) -> NoSpaceError:
    """The one-line full-disk error for ``path``: what is needed and free (when known), and ``hint``."""
    size = ""
    if need is not None:
        size = f" (needs about {_mb(need)}, {_mb(free_bytes(path))} free)"
    return NoSpaceError(f"no space left on device{size}; {hint}", path)


def free_bytes(path: str | Path) -> int:
    """Bytes free for an unprivileged user on the file system of ``path`` (or of its
    nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return 2**62  # unknown: do not refuse


def check_free_space(path: str | Path, need: int, hint: str = RETRY_HINT) -> None:
    """Refuse to write about ``need`` bytes to ``path`` when the disk has less free.

    Raises:
        NoSpaceError: naming ``path``, the bytes needed and free, and ``hint``.
    """
    if need > free_bytes(path):
        raise no_space(path, hint, need)


def _as_no_space(exc: BaseException, path: Path, inside: Path | None = None) -> NoSpaceError | None:
    """``exc`` as a :class:`NoSpaceError` naming ``path`` if it is a full-disk error, else None.

    A :class:`NoSpaceError` already naming a file under ``inside`` (a temporary file or
    folder) is renamed to the same place under ``path``.
    """
    if isinstance(exc, NoSpaceError):
        moved = exc if inside is None else exc.moved(inside, path)
        return None if moved is exc else moved
    if isinstance(exc, Exception) and is_no_space(exc):
        return no_space(path)
    return None


def new_file_mode() -> int:
    """The mode a new file gets from ``open()``: ``0o666`` less the process umask.

    Read from ``/proc/self/status`` where it exists, since setting the umask to read it
    would briefly change it for every thread; otherwise set and restored at once.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` on success.

    On any exception the temporary file is removed and ``dest`` is untouched; a
    full-disk error (from any library) is raised as a :class:`NoSpaceError` naming ``dest``.
    ``suffix`` defaults to ``dest``'s own suffixes, so libraries that pick a
    format from the file name (nibabel, SimpleITK) still do the right thing.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(dest.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{suffix}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, new_file_mode())  # mkstemp's 0600 -> what open() would have given
        os.replace(tmp_path, dest)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if (full := _as_no_space(e, dest, tmp_path)) is not None:
            raise full from None
        raise


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty folder ``.NAME.tmp`` beside ``final`` to fill; on success it becomes ``final``.

    The swap is two renames: an existing ``final`` becomes ``.NAME.old`` (then removed),
    ``.NAME.tmp`` becomes ``final``. On any exception the temporary folder is removed and
    ``final`` is untouched (a full disk is raised as a :class:`NoSpaceError` naming the file
    under ``final``); a crash between the two renames leaves ``.NAME.old``, which
    :func:`recover_dir` moves back. Whether ``final`` may be replaced is the caller's check.
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp"
    old = final.parent / f".{final.name}.old"
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if final.exists() or final.is_symlink():
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (full := _as_no_space(e, final, tmp)) is not None:
            raise full from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: str | Path) -> None:
    """Finish a swap of :func:`atomic_dir` interrupted between its two renames."""
    final = Path(final)
    old = final.parent / f".{final.name}.old"
    if not final.is_dir() and old.is_dir():
        with contextlib.suppress(OSError):
            os.rename(old, final)


def remove_temporaries(
    folder: str | Path, dests: Iterable[str] | None = None, staging: str | None = None
) -> list[str]:
    """Remove what an interrupted :func:`atomic_path` or :func:`atomic_dir` left in ``folder``.

    A kill (or a power cut) while an output is written leaves its temporary file
    ``.NAME.xxxxxxxx.tmp.SUFFIX`` (or folder ``.NAME.tmp``) beside it; no reader takes it for
    the output, but it holds disk space. Call this only where no other process writes.

    Args:
        folder: where to look (nothing happens if it does not exist).
        dests: only the temporaries of these output names (e.g. ``["train.h5"]``);
            None: every temporary in ``folder``.
        staging: also remove the folders whose names start with this prefix (a command's
            own staging folders, e.g. ``.import-``).

    Returns:
        The names removed, sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if dests is None else set(dests)
    removed = []
    for p in folder.iterdir():
        m = _TEMP_FILE.match(p.name) if p.is_file() else _TEMP_DIR.match(p.name)
        if p.is_symlink():
            continue
        if not (staging and p.name.startswith(staging) and p.is_dir()) and (
                m is None or (wanted is not None and m.group("stem") + m.group("suffix") not in wanted)):
            continue
        with contextlib.suppress(OSError):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
    return sorted(removed)


#: Names of the temporaries of :func:`atomic_path` (``tempfile.mkstemp``: 8 random
#: characters) and :func:`atomic_dir`.
_TEMP_FILE = re.compile(r"^\.(?P<stem>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>(\.[^.]+)*)$")
_TEMP_DIR = re.compile(r"^\.(?P<stem>.+)\.tmp(?P<suffix>)$")


def write_bytes_atomic(dest: str | Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(dest: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``dest`` atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    write_bytes_atomic(dest, text.encode())


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class LatchedFile(io.RawIOBase):
    """A read-write binary file for writers that must never see a failed write.

    HDF5 (2.0, through h5py's ``fileobj`` driver or its own) crashes the interpreter
    with a segmentation fault when it closes a file after a write failed on a full
    disk. Given this file instead, it never sees the failure: the first ``OSError`` of a
    write is kept in :attr:`error` and everything written from then on is held in
    memory, so the file stays consistent and closes cleanly. The caller stops writing
    as soon as :attr:`error` is set (the memory held is what it writes afterwards),
    closes, and calls :meth:`raise_error`, then discards the file.

    Example:
        >>> with atomic_path("x.h5") as tmp:  # doctest: +SKIP
        ...     raw = LatchedFile(tmp)
        ...     with h5py.File(raw, "w") as f:
        ...         ...
        ...     raw.close()
        ...     raw.raise_error("x.h5")
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._pos = 0
        self._size = 0  # the file's size as the writer sees it
        self._disk_end = 0  # bytes below this are as on disk (held ones excepted)
        self._held: list[tuple[int, bytes]] = []  # (offset, data) written after the error
        #: The first error of a write, or None.
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + int(offset))
        return self._pos

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n, pos = len(view), self._pos
        if self.error is None:
            done = 0
            try:
                while done < n:
                    done += os.pwrite(self._fd, view[done:], pos + done)
                self._disk_end = max(self._disk_end, pos + n)
            except OSError as e:
                self.error = e
        if self.error is not None:
            self._held.append((pos, bytes(view)))
        self._pos = pos + n
        self._size = max(self._size, self._pos)
        return n

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        pos = self._pos
        n = max(0, min(len(view), self._size - pos))
        got = 0
        if pos < self._disk_end:
            got = os.preadv(self._fd, [view[: min(n, self._disk_end - pos)]], pos)
        view[got:n] = bytes(n - got)
        for off, data in self._held:  # in the order written: later writes win
            lo, hi = max(off, pos), min(off + len(data), pos + n)
            if lo < hi:
                view[lo - pos : hi - pos] = data[lo - off : hi - off]
        self._pos = pos + n
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else int(size)
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as e:
                self.error = e
        self._disk_end = min(self._disk_end, size)
        self._held = [(off, data[: size - off]) for off, data in self._held if off < size]
        self._size = size
        return size

    def flush(self) -> None:
        """Nothing to flush: every write goes straight to the disk (or is held)."""

    def close(self) -> None:
        if not self.closed:
            self._held = []
            try:
                os.close(self._fd)
            except OSError as e:  # a network file system may report a full disk only now
                self.error = self.error or e
        super().close()

    def raise_error(self, dest: str | Path, hint: str = RETRY_HINT) -> None:
        """Raise the kept error as one line naming ``dest``; nothing if all writes succeeded.

        Raises:
            NoSpaceError: the disk or quota was full.
            LidcsegError: another write error (its ``strerror``).
        """
        if self.error is None:
            return
        if is_no_space(self.error):
            raise no_space(dest, hint)
        raise LidcsegError(f"cannot write: {self.error.strerror or self.error}", dest)
