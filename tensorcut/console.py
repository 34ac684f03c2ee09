"""Console messages of the library go through :mod:`logging` (logger ``tensorcut``).

The command line (and any library call made with ``progress=True``) shows them on
standard output exactly as plain ``print`` did. A caller who wants them elsewhere adds a
handler to ``logging.getLogger("tensorcut")`` first; then no console handler is added.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["ConsoleHandler", "ensure_console", "say"]

LOGGER = logging.getLogger("tensorcut")


class ConsoleHandler(logging.Handler):
    """Writes each record's message to the *current* ``sys.stdout`` (so a replaced stdout is honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except BrokenPipeError:  # the reader went away: the CLI ends quietly
            raise
        except Exception:  # noqa: BLE001 - logging must never raise into the caller (a closed pipe, say)
            self.handleError(record)


def ensure_console() -> None:
    """Show ``tensorcut`` INFO messages on the console unless logging was configured by the caller."""
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
