"""The one exception type for bad input; the CLI turns it into one line and exit status 2."""

from __future__ import annotations


class TensorcutError(ValueError):
    """Bad input or an unmet precondition, described in one line that says how to fix it.

    Every public function raises it (and only it) for input it cannot use; the CLI prints its
    message as ``tensorcut VERB: error: ...`` and exits with status 2. It is a ``ValueError``, so
    code that already catches bad values (``except ValueError``) catches it too.

    Example:
        >>> import tensorcut as tc
        >>> try:
        ...     tc.CompressConfig(method="svd3", ratio=0.5)
        ... except tc.TensorcutError as e:
        ...     print(e)
        unknown method 'svd3'; choose one of: auto, cp, tr, tt, tucker, tucker2
    """


class ConvergenceError(TensorcutError):
    """A numerical method failed (diverged, produced NaN, or did not converge)."""
