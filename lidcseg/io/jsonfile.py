"""Reading our own JSON files: strictly (a damaged one is refused in one line, never a
traceback) or, to recognise a file, leniently.

``manifest.json`` of a data folder, a run's ``state.json``, a ``--config`` file: each is
read with :func:`load_json_object` (UTF-8, valid JSON, an object) and its fields checked
with :func:`check_fields`. Every refusal names the file, says what is wrong and, where
given, how to recover (``re-run ... with --overwrite``, ``start a new run``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lidcseg.errors import LidcsegError

__all__ = ["check_fields", "is_of", "json_type", "load_json", "load_json_object", "read_json_object"]

#: Files larger than this are not read by :func:`read_json_object` (a format file of ours is small).
MAX_FORMAT_BYTES = 16 * 2**20


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: object, array, string, integer, number, boolean, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _tail(recover: str) -> str:
    return f"; {recover}" if recover else ""


def load_json(path: str | Path, *, what: str = "file", recover: str = "") -> Any:
    """``path`` parsed as JSON (any value).

    Args:
        path: the file.
        what: what it is, for the messages (``manifest``, ``training state``).
        recover: how to recover, appended to every refusal of a damaged file.

    Raises:
        LidcsegError: missing or unreadable, not UTF-8, or not JSON.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LidcsegError(f"no such {what}", path) from None
    except OSError as e:
        raise LidcsegError(f"cannot read the {what} ({e.strerror or e.__class__.__name__})", path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LidcsegError(f"{what} is not UTF-8 text (byte {e.start}){_tail(recover)}", path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LidcsegError(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
                           f"{_tail(recover)}", path) from None
    except (RecursionError, ValueError) as e:  # nesting beyond the parser's depth, huge numbers
        raise LidcsegError(f"{what} is not readable JSON ({e.__class__.__name__}){_tail(recover)}", path) from None


def load_json_object(path: str | Path, *, what: str = "file", recover: str = "") -> dict[str, Any]:
    """``path`` parsed as one JSON object (see :func:`load_json`).

    Raises:
        LidcsegError: missing or unreadable, not UTF-8, not JSON, or not an object.
    """
    data = load_json(path, what=what, recover=recover)
    if not isinstance(data, dict):
        raise LidcsegError(f"{what} is a JSON {json_type(data)}, expected an object{_tail(recover)}", path)
    return data


def check_fields(
    data: Mapping[str, Any],
    fields: Mapping[str, type | tuple[type, ...]],
    path: str | Path,
    *,
    what: str = "file",
    recover: str = "",
) -> None:
    """Refuse ``data`` (read from ``path``) unless every field is present with one of its types.

    ``int`` never admits a boolean; ``float`` admits an integer.

    Raises:
        LidcsegError: the first missing field or field of the wrong type.
    """
    for name, types in fields.items():
        if name not in data:
            raise LidcsegError(f"{what} lacks the field {name!r}{_tail(recover)}", path)
        if not is_of(data[name], types):
            want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise LidcsegError(f"{what} field {name!r} is a JSON {json_type(data[name])}, expected {want}"
                               f"{_tail(recover)}", path)


def is_of(value: Any, types: type | tuple[type, ...]) -> bool:
    """``isinstance`` as JSON means it: a boolean is not an int, an int is a float."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def read_json_object(path: Path, limit: int = MAX_FORMAT_BYTES) -> dict[str, Any] | None:
    """``path`` as a JSON object, or None when it is missing, too large, unreadable or not an object."""
    try:
        if not path.is_file() or path.stat().st_size > limit:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
