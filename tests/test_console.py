"""Console messages (``console.py``): through the ``tensorcut`` logger, on the current stdout,
unless the caller configured logging; ``--json`` output on its own stream."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from tensorcut import console


@pytest.fixture
def clean_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    """The ``tensorcut`` logger as a fresh process has it (no handlers, propagating), restored
    afterwards. Propagating matters: pytest attaches its capture handlers to a non-propagating
    logger for the test's call phase, which ensure_console would take for a caller's own."""
    log = logging.getLogger("tensorcut")
    saved = (list(log.handlers), log.level, log.propagate)
    log.handlers.clear()
    log.propagate = True
    monkeypatch.setattr(console, "JSON_STREAM", None)
    yield log
    log.handlers[:] = saved[0]
    log.setLevel(saved[1])
    log.propagate = saved[2]


def test_say_prints_to_the_current_stdout(clean_logger, capsys) -> None:
    console.say("hello")
    console.say("quiet", progress=False)
    out = capsys.readouterr()
    assert out.out == "hello\n" and out.err == ""
    assert len(clean_logger.handlers) == 1 and not clean_logger.propagate
    console.ensure_console()  # idempotent: still one handler, so no line is printed twice
    console.say("again")
    assert capsys.readouterr().out == "again\n"


def test_warnings_go_to_stderr(clean_logger, capsys) -> None:
    console.ensure_console()
    clean_logger.warning("careful")
    out = capsys.readouterr()
    assert out.err == "careful\n" and out.out == ""


def test_a_caller_handler_takes_over(clean_logger, capsys) -> None:
    buf = io.StringIO()
    clean_logger.addHandler(logging.StreamHandler(buf))
    clean_logger.setLevel(logging.INFO)
    console.say("to the caller")
    assert buf.getvalue() == "to the caller\n" and capsys.readouterr().out == ""
    assert not any(isinstance(h, console.ConsoleHandler) for h in clean_logger.handlers)


def test_say_under_a_child_logger_name(clean_logger, capsys) -> None:
    console.say("from a module", name="tensorcut.compression")
    assert capsys.readouterr().out == "from a module\n"


def test_print_json_is_one_document_on_its_stream(clean_logger, capsys, monkeypatch) -> None:
    console.print_json({"a": 1, "p": console})  # default=str: anything prints
    doc = json.loads(capsys.readouterr().out)
    assert doc["a"] == 1 and doc["p"].startswith("<module 'tensorcut.console'")
    buf = io.StringIO()
    monkeypatch.setattr(console, "JSON_STREAM", buf)
    console.print_json([1, 2])
    assert json.loads(buf.getvalue()) == [1, 2] and capsys.readouterr().out == ""
