"""The generated CLI reference (``tensorcut/cli/reference.py``): one section per verb with its full
help, at
a fixed width whatever the terminal. (That docs/cli.md is current is checked in test_docs.py.)"""

from __future__ import annotations

import runpy
import sys

import pytest

from tensorcut.cli import build_parser, verb_parsers
from tensorcut.cli.reference import cli_reference


def test_one_section_per_verb_in_parser_order() -> None:
    text = cli_reference()
    lines = text.splitlines()
    assert lines[0] == "# tensorcut command-line reference"
    heads = [ln for ln in lines if ln.startswith("## ")]
    assert heads == [f"## `tensorcut {v}`" for v in verb_parsers(build_parser())]
    assert text.count("```text") == text.count("\n```\n") == len(heads)
    for v in verb_parsers(build_parser()):
        assert f"usage: tensorcut {v} " in text


def test_fixed_width_whatever_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    wide = cli_reference()
    monkeypatch.setenv("COLUMNS", "40")
    assert cli_reference() == wide
    # argparse does not wrap a usage line's mutually exclusive group; everything else fits
    body = [ln for ln in wide.splitlines() if not ln.lstrip().startswith(("[", "(", "Generated"))]
    assert max(len(ln) for ln in body) <= 100


def test_run_as_a_module_prints_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "tensorcut.cli.reference")  # runpy runs a fresh copy
    runpy.run_module("tensorcut.cli.reference", run_name="__main__")
    assert capsys.readouterr().out == cli_reference()
