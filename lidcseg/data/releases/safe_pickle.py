"""A restricted unpickler: numpy arrays in plain containers load, nothing else runs.

:func:`pickle.load` calls whatever global a file names (``os.system``, ``builtins.eval``...).
:func:`safe_load_pickle` admits only the globals numpy arrays need, each resolved here, and
refuses any other before it is called. It reads the LIDCv1 release
(:mod:`lidcseg.data.releases.lidcv1`).

A pickle can also attack the parser itself. Before anything is built, the opcode stream is
scanned (:func:`pickletools.genops`, which builds no object) and refused when it would nest
containers deeper than :data:`MAX_DEPTH` (hashing a deeply nested tuple key overflows the C
stack), hold an integer wider than :data:`MAX_INT_BITS`, declare a value longer than the rest
of the file, or address a memo slot far beyond the ones in use. While loading, the calls that
allocate by a size (``bytes(n)``, ``numpy.ndarray(shape)``...) are bounded by the file's size.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import pickle
import pickletools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.errors import LidcsegError
from lidcseg.progress import Progress

__all__ = ["MAX_DEPTH", "MAX_INT_BITS", "safe_load_pickle"]

#: Deepest nesting of containers admitted (the LIDCv1 release nests 7 deep as counted here:
#: dict, dict, list of masks, array, its state tuple, its dtype and shape tuples).
MAX_DEPTH = 100
#: Widest integer admitted, in bits (about 77 decimal digits; shapes and sizes need far fewer).
MAX_INT_BITS = 256
#: Longest line of a text integer (digits, sign, ``L`` suffix and newline of 256 bits fit).
_MAX_DIGITS = 84


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


# -- the scan before loading ------------------------------------------------------------------


class _Node:
    """A value on the simulated stack: how deeply it nests containers."""

    __slots__ = ("depth",)

    def __init__(self, depth: int) -> None:
        self.depth = depth


_LEAF = _Node(0)  # every constant and global; never updated
_MARK = object()
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_EMPTY = frozenset({"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"})
_GLOBALS = frozenset({"GLOBAL", "STACK_GLOBAL"})


class _ScanReader(io.RawIOBase):
    """The file as :func:`pickletools.genops` reads it: a declared length past the end of the
    file, or an over-long decimal integer, is refused before it is read or converted."""

    def __init__(self, f: Any, total: int, path: Path, report: Callable[[int], None] | None) -> None:
        self._f, self._total, self._path, self._report = f, total, path, report
        self._pos, self._last_report, self._op = 0, 0, b""

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _advance(self, n: int) -> None:
        self._pos += n
        if self._report is not None and (self._pos - self._last_report >= (1 << 24) or self._pos >= self._total):
            self._last_report = self._pos
            self._report(self._pos)

    def read(self, size: int = -1) -> bytes:
        left = self._total - self._pos
        if size > 8 and size > left:
            raise LidcsegError(
                f"not a readable pickle: it declares a {size}-byte value at byte {self._pos}, "
                f"but only {left} bytes follow (truncated or hostile)", self._path)
        data = self._f.read(size)
        if size == 1:
            self._op = data  # the opcode of a text argument read next by readline
        self._advance(len(data))
        return data

    def readline(self, size: int = -1) -> bytes:
        line = self._f.readline(size)
        if self._op in (b"I", b"L", b"g", b"p") and len(line) > _MAX_DIGITS:
            raise LidcsegError(
                f"refusing to load: a number of {len(line) - 1} digits at byte {self._pos} "
                f"(at most {MAX_INT_BITS} bits are admitted)", self._path)
        self._advance(len(line))
        return line


def _scan(f: Any, total: int, path: Path, progress: Progress | None) -> None:
    """Walk the opcodes of the pickle in ``f`` without building anything; refuse one that
    nests deeper than :data:`MAX_DEPTH`, holds a wider integer than :data:`MAX_INT_BITS`,
    declares a length past the end of the file, or addresses a far memo slot."""
    report = None if progress is None else (lambda done: progress("checking pickle", done, total))
    reader = _ScanReader(f, total, path, report)
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, _Node] = {}
    n_ops = 0

    ops = pickletools.genops(reader)
    while True:
        try:
            op, arg, pos = next(ops)
        except StopIteration:
            return
        except LidcsegError:
            raise
        except Exception as e:  # genops' own errors on garbage: ValueError, UnicodeDecodeError...
            raise _unreadable(e, path) from None
        n_ops += 1
        try:
            _step(op, arg, pos, stack, marks, memo, n_ops, total, path)
        except (IndexError, KeyError) as e:  # an empty stack, an unknown memo slot
            raise LidcsegError(f"not a readable pickle (malformed opcode stream at byte {pos}: "
                               f"{e.__class__.__name__})", path) from None


def _step(op: Any, arg: Any, pos: int, stack: list[Any], marks: list[int], memo: dict[int, _Node],
          n_ops: int, total: int, path: Path) -> None:
    """Apply one opcode to the simulated ``stack`` of :class:`_Node` (``marks``: indices of
    the open marks in it); refuse what :func:`_scan` refuses."""

    def refuse(what: str) -> LidcsegError:
        return LidcsegError(f"refusing to load: {what} at byte {pos}", path)

    def deeper(depth: int) -> int:
        if depth > MAX_DEPTH:
            raise refuse(f"containers nest deeper than {MAX_DEPTH} levels")
        return depth

    name = op.name
    if type(arg) is int and arg.bit_length() > MAX_INT_BITS:
        raise refuse(f"an integer of {arg.bit_length()} bits (at most {MAX_INT_BITS})")
    if name == "FRAME" and arg > total - pos - 9:
        raise LidcsegError(f"not a readable pickle: it declares a frame of {arg} bytes at byte {pos}, "
                           f"past the end of the file ({total} bytes; truncated or hostile)", path)
    if name in _PUTS or name == "MEMOIZE":
        key = len(memo) if name == "MEMOIZE" else arg
        if key > n_ops:
            raise refuse(f"memo slot {key} far beyond the {len(memo)} in use")
        memo[key] = stack[-1]
    elif name in _GETS:
        stack.append(memo[arg])
    elif name == "DUP":
        stack.append(stack[-1])
    elif name == "MARK":
        if len(marks) >= MAX_DEPTH:
            raise refuse(f"marks nest deeper than {MAX_DEPTH} levels")
        marks.append(len(stack))
        stack.append(_MARK)
    elif name == "POP" and marks and marks[-1] == len(stack) - 1:
        marks.pop()
        stack.pop()
    else:
        popped = _pop(op, stack, marks)
        if not op.stack_after:
            return
        if name in _IN_PLACE:
            container, items = popped[0], popped[1:]
            if container is _LEAF:
                container = _Node(0)
            container.depth = deeper(max(container.depth, 1 + max((n.depth for n in items), default=-1)))
            stack.append(container)
        elif name in _GLOBALS or (not popped and name not in _EMPTY):
            stack.append(_LEAF)
        else:
            stack.append(_Node(deeper(1 + max((n.depth for n in popped), default=-1))))


def _pop(op: Any, stack: list[Any], marks: list[int]) -> list[_Node]:
    """Take ``op``'s operands off the simulated stack, in stack order."""
    before = op.stack_before
    popped: list[_Node] = []
    if pickletools.markobject in before:
        m = marks.pop()
        popped = stack[m + 1:]
        del stack[m:]
        n_pre = before.index(pickletools.markobject)
    else:
        n_pre = len(before)
    if n_pre:
        start = len(stack) - n_pre
        if start < 0 or (marks and start <= marks[-1]):
            raise IndexError("stack underflow")
        popped = stack[start:] + popped
        del stack[start:]
    return popped


def _unreadable(e: BaseException, path: Path) -> LidcsegError:
    text = " ".join(str(e).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return LidcsegError(f"not a readable pickle ({e.__class__.__name__}: {text})", path)


# -- loading ----------------------------------------------------------------------------------


def _array_bytes(shape: Any, dtype: Any) -> int:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    return math.prod(int(d) for d in dims) * np.dtype(dtype).itemsize


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers, and nothing else.

    The calls that allocate by a requested size are bounded by ``limit`` bytes: an honest
    pickle of arrays carries its data, and never asks for more memory than its own size.
    """

    def __init__(self, file: Any, path: Path, total: int) -> None:
        super().__init__(file, encoding="latin1")  # latin1: numpy arrays pickled by Python 2
        self._path = path
        self._total = total
        self._limit = max(total, 1 << 20)
        self._ndarray = _NdarrayGuard(path)

    def _bounded(self, what: str, n: int) -> None:
        if n > self._limit:
            raise LidcsegError(
                f"refusing to load: the pickle asks for {what} of {n} bytes, more than the "
                f"{self._limit} admitted for a file of {self._total} bytes (a memory bomb?)", self._path)

    def find_class(self, module: str, name: str) -> Any:
        make = _SAFE_GLOBALS.get((module, name))
        if make is None:
            raise LidcsegError(
                f"refusing to load: the pickle calls {module}.{name}, which is not part of "
                "numpy array data (possibly malicious)",
                self._path,
            )
        fn = make()
        if name in ("bytes", "bytearray"):
            def sized(*args: Any, fn: Any = fn, **kwargs: Any) -> Any:
                if args and isinstance(args[0], int):
                    self._bounded(name, args[0])
                return fn(*args, **kwargs)
            return sized
        if name == "_reconstruct":
            def reconstruct(subtype: Any, shape: Any, dtype: Any, fn: Any = fn) -> Any:
                self._bounded("an array", _array_bytes(shape, dtype))
                return fn(np.ndarray if subtype is self._ndarray else subtype, shape, dtype)
            return reconstruct
        if name == "ndarray":
            return self._ndarray
        return fn

    def persistent_load(self, pid: Any) -> Any:
        raise LidcsegError("refusing to load: the pickle uses persistent ids", self._path)


class _NdarrayGuard:
    """``numpy.ndarray`` as a pickle names it: what ``_reconstruct`` is given. Calling it
    directly (which allocates by shape, never done by numpy's own pickles) is refused."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise LidcsegError("refusing to load: the pickle calls numpy.ndarray(...) directly, which "
                           "numpy's own array pickles never do", self._path)


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
    global, before it is called. The opcode stream is scanned first, building nothing: a
    pickle nesting deeper than :data:`MAX_DEPTH`, with an integer wider than
    :data:`MAX_INT_BITS` or a length past the end of the file is refused before loading.

    Raises:
        LidcsegError: missing file, not a pickle, a forbidden global, or a pickle that
            attacks the parser (nesting, sizes); one line naming the file and the limit.
    """
    path = Path(path)
    if not path.exists():
        raise LidcsegError("no such file", path)
    if not path.is_file():
        raise LidcsegError("not a file", path)
    total = path.stat().st_size
    try:
        with open(path, "rb") as raw:
            _scan(raw, total, path, progress)
            raw.seek(0)
            f: Any = raw
            if progress is not None:
                f = _CountingReader(raw, total, lambda done: progress("reading pickle", done, total))
                progress("reading pickle", 0, total)
            return _SafeUnpickler(f, path, total).load()
    except LidcsegError:
        raise
    except MemoryError:
        raise LidcsegError("out of memory while reading the pickle", path) from None
    except OSError as e:
        raise LidcsegError(f"cannot read the file ({e.strerror or e.__class__.__name__})", path) from None
    except Exception as e:  # whatever the unpickler raises on garbage is a refusal, not a bug
        raise _unreadable(e, path) from None
