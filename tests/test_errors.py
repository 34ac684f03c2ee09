"""The exception types (``errors.py``): one for bad input, a subtype for numerical failures."""

from __future__ import annotations

import pytest

import tensorcut
from tensorcut.errors import ConvergenceError, TensorcutError


def test_hierarchy() -> None:
    assert issubclass(TensorcutError, ValueError)  # DESIGN: bad input is a ValueError
    assert issubclass(ConvergenceError, TensorcutError)  # one `except TensorcutError` catches both
    assert tensorcut.TensorcutError is TensorcutError
    assert tensorcut.ConvergenceError is ConvergenceError


def test_the_docstring_example_holds() -> None:
    """The example in TensorcutError's docstring prints exactly what the library raises."""
    with pytest.raises(TensorcutError) as e:
        tensorcut.CompressConfig(method="svd3", ratio=0.5)
    assert type(e.value) is TensorcutError
    assert str(e.value) in (TensorcutError.__doc__ or "")


def test_cli_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """What the docstring promises: ``tensorcut VERB: error: ...`` and status 2."""
    from tensorcut.cli import main

    assert main(["inspect", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tensorcut inspect: error: ")
