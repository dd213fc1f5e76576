"""Shared pieces of the CLI: one-line errors, the safety net, argument parsing and the one progress bar.

Every failure reaches the user as one line on stderr and a non-zero exit:

* a :class:`lidcseg.LidcsegError` (bad input, named file and problem) and a few OS errors
  (:func:`one_line_errors`, on every command): ``error: ...``, exit 2;
* a usage error of the command line (unknown option, a value of the wrong type): exit 2;
* anything else is a bug (:class:`SafeGroup`, the safety net at the top): ``error: internal
  error: ...; details in <log file>``, the traceback written to that file, exit 3. ``--debug``
  or ``LIDCSEG_DEBUG=1`` shows the traceback instead.
"""


from __future__ import annotations

import datetime
import functools
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

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
            if e.errno in (28, 122):  # ENOSPC, EDQUOT: a writer that did not name its file
                where = f"{e.filename}: " if e.filename else ""
                _fail(f"{where}no space left on device; free some space and run again")
            raise

    return wrapper  # type: ignore[return-value]


def _fail(msg: str) -> None:
    _say(msg)
    raise typer.Exit(code=2)


def _say(msg: str) -> None:
    msg = " ".join(str(msg).split())  # exactly one line
    print(f"error: {msg}", file=sys.stderr)


#: Exit code of an internal error (a bug), as opposed to 2 for bad input.
INTERNAL_ERROR_EXIT = 3
#: Set by ``lidcseg --debug``: unexpected exceptions show their traceback.
debug_mode = False


def debugging() -> bool:
    """``--debug`` was given or ``LIDCSEG_DEBUG`` is set to something other than 0/empty."""
    return debug_mode or os.environ.get("LIDCSEG_DEBUG", "").strip() not in ("", "0")


def error_log_dir() -> Path:
    """Where internal-error logs go: ``$XDG_CACHE_HOME/lidcseg/errors`` (default ``~/.cache``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "lidcseg" / "errors"


def write_error_log(exc: BaseException, argv: list[str]) -> Path | None:
    """Write the traceback of ``exc`` (and the command line) to a new log file; its path, or None."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (f"lidcseg {' '.join(argv)}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for folder in (error_log_dir(), Path(tempfile.gettempdir()) / "lidcseg-errors"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"internal-error-{stamp}-{os.getpid()}.log"
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


class SafeGroup(TyperGroup):
    """The root command: usage errors in one line, and the safety net for unexpected exceptions."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError
        from typer.exceptions import Abort

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:
            e.show()  # the help text
            sys.exit(e.exit_code)
        except ClickException as e:
            _say(e.format_message())
            sys.exit(e.exit_code)
        except (Abort, KeyboardInterrupt):
            _say("interrupted")
            sys.exit(130)
        except Exception as e:
            if debugging():
                raise
            log = write_error_log(e, argv)
            where = f"details in {log}" if log else "run again with --debug for details"
            _say(f"internal error: {type(e).__name__}: {e}; {where}")
            sys.exit(INTERNAL_ERROR_EXIT)
        sys.exit(rv if isinstance(rv, int) else 0)


def report_cleanup(manifest: dict[str, Any]) -> None:
    """Say what the command removed of an interrupted earlier run (the manifest's file warnings)."""
    for w in manifest.get("warnings") or []:
        if isinstance(w, dict) and w.get("file"):
            console.print(f"warning: {w['file']}: {w.get('warning', '')}", markup=False, highlight=False,
                          soft_wrap=True)


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


class Bar:
    """One rich progress bar of :func:`progress_bar`."""

    def __init__(self, progress: Progress, task: TaskID, started: bool) -> None:
        self._progress, self._task, self.started = progress, task, started

    def update(self, **fields: Any) -> None:
        """Set ``completed``, ``total``, ``advance``, ``description`` or a text field."""
        self._progress.update(self._task, **fields)

    def start(self) -> None:
        """Show a bar made with ``start=False`` (the first call; later ones do nothing)."""
        if not self.started:
            self.started = True
            self._progress.start()
            self._progress.start_task(self._task)

    @property
    def elapsed(self) -> float:
        """Seconds since the bar started (never 0, so that it can divide)."""
        return self._progress.tasks[self._task].elapsed or 1e-9


@contextmanager
def progress_bar(
    label: str,
    *fields: str,
    total: float | None = None,
    remaining: bool = False,
    start: bool = True,
    disable: bool = False,
    **values: Any,
) -> Iterator[Bar]:
    """THE progress display of every command: one transient rich bar on stderr.

    Columns: ``label`` (the task's description), the bar, done/total, one text column
    per template of ``fields`` (e.g. ``"{task.fields[rate]}"``, initial ``values`` by
    keyword), the time remaining if ``remaining``, the time elapsed.

    Args:
        start: False: the bar appears at the first :meth:`Bar.start`, so that an input
            error raised before it prints no empty bar.
        disable: show nothing (e.g. on DDP ranks other than 0). Nothing is shown either when
            stderr is not a terminal: a bar there prints only a stray empty line.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    # Descriptions and fields are plain text (stage names, run keys, paths): never rich markup or
    # emoji codes, so "flip:train:probunet" shows as written and a "[" in a path stays.
    columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               *(TextColumn(f, markup=False) for f in fields), *([TimeRemainingColumn()] if remaining else []),
               TimeElapsedColumn()]
    progress = Progress(*columns, console=console, transient=True,
                        disable=disable or not console.is_terminal)
    bar = Bar(progress, progress.add_task(label, total=total, start=start, **values), start)
    if start:
        progress.start()
    try:
        yield bar
    finally:
        if bar.started:  # a never-started Progress still prints a newline when stopped
            progress.stop()


@contextmanager
def stage_progress(disable: bool = False) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar fed by the library's ``progress(stage, done, total)`` callback.

    ``disable``: show nothing (rich prints an empty line when a bar stops on a console that
    is not a terminal; ``lidcseg import`` passes ``not console.is_terminal`` to avoid it).
    """
    with progress_bar("start", total=1, disable=disable) as bar:
        yield lambda stage, done, total: bar.update(description=stage, completed=done,
                                                    total=max(total, 1))
