"""Shared pieces of the CLI: one-line errors and rich progress."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])

console = Console(stderr=True)


def one_line_errors(fn: F) -> F:
    """Turn :class:`lidcseg.LidcsegError` (and a few OS errors) into one line and exit 2.

    Bugs still raise with a traceback: only errors about the user's input are
    shortened.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from lidcseg.errors import LidcsegError

        try:
            return fn(*args, **kwargs)
        except LidcsegError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted")
        except (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError) as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{where}{e.strerror or e}")
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                _fail(f"{e.filename or ''}: no space left on device")
            raise

    return wrapper  # type: ignore[return-value]


def _fail(msg: str) -> None:
    msg = " ".join(str(msg).split())  # exactly one line
    print(f"error: {msg}", file=sys.stderr)
    raise typer.Exit(code=2)


def parse_csv(value: str | None) -> list[str] | None:
    """Split ``a,b,c`` into a list; ``None`` stays ``None``."""
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_counts(text: str) -> list[int]:
    """``-n 1,4,8,16``: sample counts, each >= 1 (a one-line error otherwise)."""
    from lidcseg.errors import LidcsegError

    try:
        counts = [int(v) for v in parse_csv(text) or []]
    except ValueError:
        raise LidcsegError(f"-n expects sample counts like 1,4,8,16, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise LidcsegError(f"-n expects sample counts >= 1, got {text!r}")
    return counts


@contextmanager
def stage_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar fed by the library's ``progress(stage, done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)
    task = progress.add_task("start", total=1)

    def update(stage: str, done: int, total: int) -> None:
        progress.update(task, description=stage, completed=done, total=max(total, 1))

    with progress:
        yield update
