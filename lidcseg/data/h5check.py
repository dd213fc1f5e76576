"""The schema check of our HDF5 split files at open time (crops and scenes alike).

A split file is trusted only once :func:`check_split_file` has seen its format and version,
the size attributes its layout depends on, every dataset of that layout with the right
rank, row shape and dtype, and the same number of rows in each (one row per crop or
scene). Anything else is refused in one line that names the file, says what is wrong and
how to re-create it (the writing command with ``--overwrite``): the stores
(:mod:`lidcseg.data.store`, :mod:`lidcseg.data.scenes.store`) then read it without
further checks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lidcseg.errors import LidcsegError

__all__ = ["Layout", "check_split_file", "plain"]

#: name -> (row shape, dtype) of every dataset of a valid file; h5py's string dtype for text.
Layout = Mapping[str, tuple[tuple[int, ...], Any]]


def plain(v: Any) -> Any:
    """An HDF5 attribute as a plain Python value (numpy scalars and bytes converted)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def _dtype_name(dt: Any) -> str:
    return "str" if h5py.check_string_dtype(np.dtype(dt)) is not None else str(np.dtype(dt))


def _dtype_ok(actual: np.dtype, expected: Any) -> bool:
    if h5py.check_string_dtype(np.dtype(expected)) is not None:
        return h5py.check_string_dtype(actual) is not None
    return actual == np.dtype(expected)


def check_split_file(
    path: Path,
    *,
    what: str,
    format_name: str,
    format_version: int,
    size_attrs: tuple[str, ...],
    layout: Callable[[Mapping[str, int]], Layout],
    recover: Callable[[Mapping[str, Any]], str],
) -> tuple[dict[str, Any], int]:
    """Check the split file ``path`` against its format; return ``(attributes, rows)``.

    Args:
        path: the file (must exist).
        what: ``crop`` or ``scene``, for the messages.
        format_name, format_version: the ``format`` and ``format_version`` attributes.
        size_attrs: attributes that must be integers >= 1 (``crop_size``, ``n_graders``).
        layout: the datasets a valid file holds, given its size attributes (the writer's
            own :meth:`~lidcseg.data.store.AppendH5.layout`).
        recover: how to re-create the file, given whatever attributes could be read.

    Raises:
        LidcsegError: not HDF5, truncated, another format or version, a missing or
            malformed size attribute, a missing dataset, one of the wrong rank, row shape
            or dtype, or datasets of different lengths; one line ending in ``recover``.
    """
    attrs: dict[str, Any] = {}

    def bad(problem: str) -> LidcsegError:
        return LidcsegError(f"{problem}; {recover(attrs)}", path)

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: plain(v) for k, v in f.attrs.items()}
            if attrs.get("format") != format_name:
                raise bad(f"not a {format_name} file (format attribute {str(attrs.get('format'))[:40]!r})")
            version = attrs.get("format_version")
            if type(version) is not int or version != format_version:
                raise LidcsegError(
                    f"{what} format version {str(version)[:20]}, this lidcseg reads {format_version}; "
                    f"{recover(attrs)}", path)
            sizes: dict[str, int] = {}
            for name in size_attrs:
                v = attrs.get(name)
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    problem = "missing" if name not in attrs else f"{str(v)[:40]!r} is not an integer >= 1"
                    raise bad(f"attribute {name}: {problem}")
                sizes[name] = v
            rows: dict[str, int] = {}
            for name, (row, dtype) in layout(sizes).items():
                ds = f.get(name)
                if not isinstance(ds, h5py.Dataset):
                    raise bad(f"no {name!r} dataset" if ds is None else f"{name!r} is not a dataset")
                want = ("N", *row)
                if ds.shape is None or ds.shape[1:] != tuple(row) or len(ds.shape) != len(want):
                    raise bad(f"dataset {name!r} has shape {ds.shape}, expected "
                              f"({', '.join(map(str, want))}{',' if len(want) == 1 else ''})")
                if not _dtype_ok(ds.dtype, dtype):
                    raise bad(f"dataset {name!r} has dtype {ds.dtype}, expected {_dtype_name(dtype)}")
                rows[name] = int(ds.shape[0])
    except LidcsegError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:  # h5py on a damaged file
        text = " ".join(str(e).split())[:100]
        raise bad(f"cannot read HDF5, damaged or truncated ({e.__class__.__name__}: {text})") from None
    counts = set(rows.values())
    if len(counts) > 1:
        first = next(iter(rows))
        odd = [f"{k} {n}" for k, n in rows.items() if n != rows[first]]
        raise bad(f"per-{what} datasets of different lengths: {first} {rows[first]}, {', '.join(odd)}")
    return attrs, counts.pop() if counts else 0
