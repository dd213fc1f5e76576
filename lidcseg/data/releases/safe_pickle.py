"""A restricted unpickler: numpy arrays in plain containers load, nothing else runs.

:func:`pickle.load` calls whatever global a file names (``os.system``, ``builtins.eval``...).
:func:`safe_load_pickle` admits only the globals numpy arrays need, each resolved here, and
refuses any other before it is called. It reads the LIDCv1 release
(:mod:`lidcseg.data.releases.lidcv1`).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.errors import LidcsegError
from lidcseg.progress import Progress

__all__ = ["safe_load_pickle"]


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    for mod in modules:
        with contextlib.suppress(ImportError, AttributeError):
            return getattr(importlib.import_module(mod), name)
    raise AttributeError(name)  # pragma: no cover - numpy always has one of them


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")

#: The only globals a pickle of numpy arrays in plain containers needs. Each is resolved
#: here, never by importing the module the file names.
_SAFE_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    **{(m, "_reconstruct"): (lambda: _numpy_attr(_MULTIARRAY, "_reconstruct")) for m in _MULTIARRAY},
    **{(m, "scalar"): (lambda: _numpy_attr(_MULTIARRAY, "scalar")) for m in _MULTIARRAY},
    **{(m, "_frombuffer"): (lambda: _numpy_attr(_NUMERIC, "_frombuffer")) for m in _NUMERIC},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,  # bytes in protocol <= 2
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    **{
        (mod, name): (lambda name=name: getattr(__import__("builtins"), name))
        for mod in ("builtins", "__builtin__")
        for name in ("list", "dict", "tuple", "set", "frozenset", "bytearray", "bytes",
                     "str", "int", "float", "complex", "bool")
    },
}


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers, and nothing else."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # latin1: numpy arrays pickled by Python 2
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        make = _SAFE_GLOBALS.get((module, name))
        if make is None:
            raise LidcsegError(
                f"refusing to load: the pickle calls {module}.{name}, which is not part of "
                "numpy array data (possibly malicious)",
                self._path,
            )
        return make()

    def persistent_load(self, pid: Any) -> Any:
        raise LidcsegError("refusing to load: the pickle uses persistent ids", self._path)


class _CountingReader(io.RawIOBase):
    """A read-only file wrapper that reports the bytes read so far."""

    def __init__(self, f: Any, total: int, report: Callable[[int], None]) -> None:
        self._f, self._total, self._report, self._done, self._last = f, total, report, 0, 0

    def readable(self) -> bool:
        return True

    def _count(self, n: int) -> None:
        self._done += n
        if self._done - self._last >= (1 << 24) or self._done >= self._total:
            self._last = self._done
            self._report(self._done)

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._count(len(data))
        return data

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)
        self._count(n or 0)
        return n

    def readline(self, size: int = -1) -> bytes:
        data = self._f.readline(size)
        self._count(len(data))
        return data


def safe_load_pickle(path: str | Path, progress: Progress | None = None) -> Any:
    """Load a pickle of numpy arrays in dicts/lists **without running code from the file**.

    :func:`pickle.load` calls whatever global the file names (``os.system``,
    ``builtins.eval``...). Here only the globals numpy arrays need are admitted (see
    ``_SAFE_GLOBALS``); any other raises :class:`LidcsegError` naming the file and the
    global, before it is called.

    Raises:
        LidcsegError: missing file, not a pickle, or a forbidden global.
    """
    path = Path(path)
    if not path.exists():
        raise LidcsegError("no such file", path)
    if not path.is_file():
        raise LidcsegError("not a file", path)
    total = path.stat().st_size
    try:
        with open(path, "rb") as raw:
            f: Any = raw
            if progress is not None:
                f = _CountingReader(raw, total, lambda done: progress("reading pickle", done, total))
                progress("reading pickle", 0, total)
            return _SafeUnpickler(f, path).load()
    except LidcsegError:
        raise
    except MemoryError:
        raise LidcsegError("out of memory while reading the pickle", path) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, OverflowError) as e:
        raise LidcsegError(f"not a readable pickle ({e.__class__.__name__}: {e})", path) from None
