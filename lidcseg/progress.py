"""How the library reports progress instead of printing: a ``progress(stage, done, total)`` callback.

Long library functions take ``progress: Progress | None``; the CLI passes the one
rich progress bar of :mod:`lidcseg_cli._common`, tests pass a list's ``append``.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: ``done`` of ``total`` units of ``stage`` are finished."""
