"""Config dataclasses from JSON values, with every field's type checked first.

:func:`from_dict` is how a config is built from anything a user or a file supplies (a
``--config`` file, ``--set`` overrides, a run's ``config.json``, a checkpoint). A value of
the wrong type (a string for an int, a float for a channel count, a list for a float, a
boolean for a number) is refused in one line naming the field, the value and the type
expected, before the dataclass is built: its range checks then only see the right types.
Re-exported by :mod:`lidcseg.config`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from lidcseg.errors import LidcsegError
from lidcseg.io.jsonfile import is_of, json_type, load_json

T = TypeVar("T")

__all__ = ["from_dict", "read_json"]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _expected(hint: Any) -> str:
    """How a field's type reads in a message."""
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_expected(args[0]).removeprefix('an ').removeprefix('a ')}s"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_expected(args[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a list of {len(args)} values"
    return getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """``(fits, value as the field holds it)``: floats admit integers, tuples lists."""
    if hint in (bool, int, str):
        return is_of(value, hint), value
    if hint is float:
        return (True, float(value)) if is_of(value, float) else (False, value)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and args:
        if not isinstance(value, list | tuple):
            return False, value
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return False, value
        converted = [_convert(v, h) for v, h in zip(value, items, strict=True)]
        return all(ok for ok, _ in converted), tuple(v for _, v in converted)
    return True, value  # a type this check does not know: left to the dataclass


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _shown(value: Any) -> str:
    """The value as JSON, cut to 60 characters."""
    text = json.dumps(value, default=str, allow_nan=True)
    return text if len(text) <= 60 else text[:57] + "..."


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str | Path | None = None) -> T:
    """Build the config dataclass ``cls`` from JSON values, checking names and types first.

    Integers are admitted for float fields, JSON lists for tuple fields; nothing else is
    converted (``"32"`` is not a channel count, ``32.0`` is not an integer, ``1`` is not
    ``true``).

    Raises:
        LidcsegError: ``data`` is not an object, unknown fields, or a value of the wrong
            type (naming the field, the value and the type expected); ``source`` is the
            file named, if any.
    """
    if not isinstance(data, Mapping):
        raise LidcsegError(f"{cls.__name__}: expected a JSON object, got {_a(json_type(data))}", source)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(data) - fields)
    if unknown:
        raise LidcsegError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}", source)
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        ok, kwargs[name] = _convert(value, hint)
        if not ok:
            raise LidcsegError(f"{cls.__name__}.{name}: {_shown(value)} is {_a(json_type(value))}, "
                               f"expected {_expected(hint)}", source)
    return cls(**kwargs)


def read_json(path: Path) -> Any:
    """A config file's JSON value.

    Raises:
        LidcsegError: missing, unreadable, not UTF-8 or not JSON; one line naming the file.
    """
    if not path.exists():
        raise LidcsegError("config file not found", path)
    return load_json(path, what="config file")
