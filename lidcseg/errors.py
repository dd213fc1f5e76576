"""The one error type the command line turns into a one-line message."""

from __future__ import annotations

from pathlib import Path


class LidcsegError(Exception):
    """A user-facing error: bad input, a failed validation, a refused operation.

    The message is one line that names the file (when there is one) and the
    problem. The CLI prints it without a traceback and exits non-zero.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)
