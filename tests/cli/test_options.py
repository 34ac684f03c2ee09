"""CLI flags derived from every method's typed Options (tensorcut/cli/options.py)."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from tensorcut.cli.options import add_method_option_flags, method_options_from_args
from tensorcut.compression import CompressConfig
from tensorcut.layers import get_method, list_methods


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_method_option_flags(p)
    return p


@pytest.mark.parametrize("method", list_methods())
def test_every_option_field_has_a_flag(method: str) -> None:
    flags = {s for a in _parser()._actions for s in a.option_strings}
    for f in fields(get_method(method).Options):
        assert f"--{method}-{f.name.replace('_', '-')}" in flags


def test_nothing_given_means_no_options() -> None:
    assert method_options_from_args(_parser().parse_args([])) == {}


def test_flags_reach_the_typed_options() -> None:
    args = _parser().parse_args(
        ["--cp-n-iter-max", "50", "--no-tucker2-hooi", "--tr-shifts", "0", "2"]
    )
    opts = method_options_from_args(args)
    assert opts == {"cp": {"n_iter_max": 50}, "tucker2": {"hooi": False}, "tr": {"shifts": (0, 2)}}
    cfg = CompressConfig(method="auto", ratio=0.3, options=opts)
    assert cfg.method_options("cp").n_iter_max == 50
    assert cfg.method_options("tucker2").hooi is False
    assert cfg.method_options("tr").shifts == (0, 2)
    assert cfg.to_dict()["options"]["tr"] == {"shifts": (0, 2)}


def test_a_wrong_type_is_an_argparse_error() -> None:
    with pytest.raises(argparse.ArgumentError, match="invalid int value: 'many'"):
        _parser().parse_args(["--cp-n-iter-max", "many"])


def test_a_bad_choice_is_refused_by_the_options_class() -> None:
    opts = method_options_from_args(_parser().parse_args(["--tr-objective", "speed"]))
    with pytest.raises(Exception, match="tr objective must be 'params' or 'macs', got 'speed'"):
        CompressConfig(method="tr", eps=0.3, options=opts)


def test_options_for_another_method_are_refused() -> None:
    with pytest.raises(
        Exception, match="options for tr given but method is 'cp'; drop them or use"
    ):
        CompressConfig(method="cp", ratio=0.3, options={"tr": {"shift": 1}})


def test_compress_verb_takes_the_derived_flags(tmp_path) -> None:
    from tensorcut.cli import build_parser

    args = build_parser().parse_args(
        [
            "compress",
            "ck",
            "--out",
            str(tmp_path / "o"),
            "--method",
            "cp",
            "--keep",
            "0.3",
            "--cp-n-iter-max",
            "7",
        ]
    )
    assert method_options_from_args(args) == {"cp": {"n_iter_max": 7}}
