"""The one exception type for bad input; the CLI turns it into one line and exit status 2."""

from __future__ import annotations


class TensorcutError(Exception):
    """Bad input or an unmet precondition, described in one line that says how to fix it."""


class ConvergenceError(TensorcutError):
    """A numerical method failed (diverged, produced NaN, or did not converge)."""
