"""Console messages of the library go through :mod:`logging` (logger ``tensorcut``).

The command line (and any library call made with ``progress=True``) shows them on
standard output exactly as plain ``print`` did. A caller who wants them elsewhere adds a
handler to ``logging.getLogger("tensorcut")`` first; then no console handler is added.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

__all__ = ["ConsoleHandler", "ensure_console", "print_json", "say"]

LOGGER = logging.getLogger("tensorcut")

#: Where :func:`print_json` writes; the CLI points it at the real stdout while ``--json`` sends
#: everything else (progress, tables) to stderr, so stdout holds exactly one JSON document.
JSON_STREAM: TextIO | None = None


class ConsoleHandler(logging.Handler):
    """Writes each record's message to the *current* ``sys.stdout``.

    Looked up per record, so a replaced stdout is honoured (warnings go to ``sys.stderr``).
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except BrokenPipeError:  # the reader went away: the CLI ends quietly
            raise
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def ensure_console() -> None:
    """Show ``tensorcut`` INFO messages on the console, unless the caller configured logging."""
    if LOGGER.handlers:  # ours, or the caller's own: they decide
        return
    h = ConsoleHandler()
    h.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(h)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def say(msg: str, progress: bool = True, name: str = "tensorcut") -> None:
    """Log ``msg`` at INFO (shown on the console when ``progress``)."""
    if progress:
        ensure_console()
        logging.getLogger(name).info(msg)


def print_json(obj: Any) -> None:
    """Write ``obj`` as one JSON document (the result of a ``--json`` verb) to stdout."""
    stream = JSON_STREAM or sys.stdout
    stream.write(json.dumps(obj, indent=2, default=str) + "\n")
    stream.flush()
