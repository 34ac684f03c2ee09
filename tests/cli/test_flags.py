"""Flags derived from config dataclasses and the one ``--out`` (``tensorcut/cli/flags.py``), and
their use for FitConfig in ``train`` / ``finetune``: every field reachable, parsed to its type,
landing in the config; bad values refused in one line with status 2."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from tensorcut.cli import build_parser, main, verb_parsers
from tensorcut.cli.flags import (
    OUT_KINDS,
    Flag,
    add_dataclass_flags,
    default_text,
    describe,
    given_values,
)
from tensorcut.cli.options import FIT_FLAGS
from tensorcut.cli.train import TRAIN_SKIPS, train_config
from tensorcut.cli.workflow import finetune_config
from tensorcut.train.config import FitConfig
from tensorcut.train.recipes import RECIPES

# ------------------------------------------------------------------------------ the generic helper


@dataclass
class _Cfg:
    n: int = 3
    rate: float | None = None
    mode: Literal["a", "b"] = "a"
    fast: bool = False
    sizes: tuple[int, ...] = (1, 2)
    long_name: str = field(default="x", metadata={"help": "from the field"})


def _parser(**kw: Any) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_dataclass_flags(p, _Cfg, **kw)
    return p


def test_types_choices_booleans_and_tuples_are_derived() -> None:
    a = _parser().parse_args(
        ["--n", "5", "--rate", "0.5", "--mode", "b", "--no-fast", "--sizes", "4", "6"]
    )
    assert given_values(a, _Cfg) == {
        "n": 5, "rate": 0.5, "mode": "b", "fast": False, "sizes": (4, 6),
    }  # fmt: skip
    assert given_values(_parser().parse_args([]), _Cfg) == {}  # nothing given: nothing set
    assert given_values(_parser().parse_args(["--fast"]), _Cfg) == {"fast": True}


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--n", "1.5"], "argument --n: invalid int value: '1.5'"),
        (["--mode", "c"], "argument --mode: invalid choice: 'c'"),
        (["--rate", "fast"], "argument --rate: invalid float value: 'fast'"),
    ],
)
def test_a_wrong_value_is_an_argparse_error(argv: list[str], msg: str) -> None:
    with pytest.raises(argparse.ArgumentError, match=msg.replace("(", r"\(")):
        _parser().parse_args(argv)


def test_names_help_defaults_skip_and_only() -> None:
    p = _parser(
        flags={"long_name": Flag(name="ln", metavar="TEXT"), "n": Flag(help="how many")},
        skip=("sizes",),
        defaults=lambda name: describe(getattr(_Cfg(), name)),
        prefix="x-",
        dest="c__{field}",
    )
    acts = {a.dest: a for a in p._actions}
    assert acts["c__long_name"].option_strings == ["--x-ln"]
    assert acts["c__long_name"].metavar == "TEXT"
    assert acts["c__long_name"].help == "from the field (default: x)"
    assert acts["c__n"].help == "how many (default: 3)"
    assert acts["c__fast"].option_strings == ["--x-fast", "--no-x-fast"]
    assert acts["c__fast"].help == "fast (default: off)"
    assert "c__sizes" not in acts
    assert given_values(p.parse_args(["--x-ln", "y"]), _Cfg, "c__{field}") == {"long_name": "y"}
    only = argparse.ArgumentParser()
    assert list(add_dataclass_flags(only, _Cfg, only=("mode", "n"))) == ["mode", "n"]
    with pytest.raises(ValueError, match=r"_Cfg has no field\(s\) \['nope'\]"):
        add_dataclass_flags(argparse.ArgumentParser(), _Cfg, skip=("nope",))


@pytest.mark.parametrize(
    "value,text",
    [(None, "none"), (True, "on"), (1e-5, "1e-5"), (0.0001, "0.0001"), (("OUT", 2), "OUT 2")],
)
def test_describe(value: Any, text: str) -> None:
    assert describe(value) == text


# ----------------------------------------------------------------------- FitConfig on the verbs

BASE = {
    "train": ["train", "--model", "vanilla-cnn", "--dataset", "digits", "--out", "o"],
    "finetune": ["finetune", "ck", "--out", "o"],
}
CONFIG = {"train": train_config, "finetune": finetune_config}
FIT_FIELDS = [f.name for f in dataclasses.fields(FitConfig)]


def _flag_for(verb: str, name: str) -> argparse.Action | None:
    acts = [a for a in verb_parsers(build_parser())[verb]._actions if a.dest == name]
    return acts[0] if acts else None


def _another_value(name: str, base: FitConfig) -> tuple[list[str], Any]:
    """Words giving field ``name`` a valid value other than ``base``'s, and that value."""
    old = getattr(base, name)
    spec = FIT_FLAGS.get(name, Flag())
    flag = f"--{spec.name or name.replace('_', '-')}"
    hint = typing.get_type_hints(FitConfig)[name]
    if hint is bool:
        return ([flag] if not old else [flag.replace("--", "--no-", 1)]), not old
    choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
    if choices:
        new = next(c for c in reversed(choices) if c != old)
        return [flag, str(new)], new
    if int in (hint, *typing.get_args(hint)):
        new = (old or 0) + 2
        return [flag, str(new)], new
    new = 0.5 if old != 0.5 else 0.25  # in range for every float field
    return [flag, str(new)], new


@pytest.mark.parametrize("verb", ["train", "finetune"])
@pytest.mark.parametrize("name", FIT_FIELDS)
def test_every_fit_config_field_reaches_the_config(verb: str, name: str) -> None:
    act = _flag_for(verb, name)
    if verb == "train" and name in TRAIN_SKIPS:
        assert act is None and TRAIN_SKIPS[name]  # left out, with the reason
        return
    assert act is not None, f"{verb} has no flag for FitConfig.{name}"
    assert act.help and "(default: " in act.help
    base = FitConfig() if verb == "train" else RECIPES["thesis"]
    words, value = _another_value(name, base)
    args = build_parser().parse_args([*BASE[verb], *words])
    cfg = CONFIG[verb](args)
    assert getattr(cfg, name) == value and type(getattr(cfg, name)) is type(value)
    others = {f: getattr(cfg, f) for f in FIT_FIELDS if f != name}
    assert others == {f: getattr(base, f) for f in FIT_FIELDS if f != name}


def test_train_leaves_out_only_distillation() -> None:
    assert set(TRAIN_SKIPS) == {"distill_alpha", "distill_temperature"}


def test_user_visible_names_are_kept() -> None:
    """The flag of sync_batchnorm stays --sync-bn; every other is the field's name."""
    for verb in ("train", "finetune"):
        flags = {s for a in verb_parsers(build_parser())[verb]._actions for s in a.option_strings}
        assert {"--sync-bn", "--no-sync-bn", "--amp", "--epochs", "--lr", "--patience"} <= flags
        assert "--sync-batchnorm" not in flags
    renamed = {n: s.name for n, s in FIT_FLAGS.items() if s.name}
    assert renamed == {"sync_batchnorm": "sync-bn"}
    assert FIT_FLAGS == {"sync_batchnorm": Flag(name="sync-bn")}  # the rest: from FitConfig


@pytest.mark.parametrize("verb", ["train", "finetune"])
def test_recipe_flags_take_help_and_choices_from_fit_config(verb: str) -> None:
    """Each flag's help is its field's ``metadata["help"]``; choices come from the Literal."""
    parser = verb_parsers(build_parser())[verb]
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(FitConfig):
        if f.name not in by_dest:
            continue
        act = by_dest[f.name]
        assert act.help is not None and act.help.startswith(f.metadata["help"]), f.name
    assert tuple(by_dest["optimizer"].choices) == ("adam", "sgd")
    assert tuple(by_dest["scheduler"].choices) == ("plateau", "cosine", "onecycle", "none")


def test_choices_from_metadata_and_the_none_text() -> None:
    @dataclass
    class C:
        kind: str = field(default="x", metadata={"help": "which", "choices": ("x", "y")})
        stop: int | None = field(default=None, metadata={"help": "stop", "none": "never"})

    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    acts = add_dataclass_flags(p, C)
    assert tuple(acts["kind"].choices) == ("x", "y") and acts["kind"].help == "which"
    assert default_text(C, "stop") == "never" and default_text(C, "kind") == "x"
    assert default_text(C, "stop", {"stop": Flag(none_text="off")}) == "off"
    assert default_text(FitConfig, "patience") == "no early stopping"


@pytest.mark.parametrize("verb", ["train", "finetune"])
def test_patience_zero_turns_early_stopping_off(verb: str) -> None:
    args = build_parser().parse_args([*BASE[verb], "--patience", "0"])
    assert CONFIG[verb](args).patience is None


def test_finetune_help_names_the_recipes_defaults() -> None:
    text = " ".join(verb_parsers(build_parser())["finetune"].format_help().split())
    assert "training epochs (default: the recipe's: thesis 50, rsdtr 160)" in text
    assert "SGD momentum, in [0, 1) (default: 0.9)" in text
    assert "(with --distill-from), in [0, 1] (default: 0.5)" in text


def _refused(capsys: Any, argv: list[str], msg: str, prog: str = "") -> None:
    """Exit status 2 and one error line ``tensorcut VERB: error: MSG...`` (after argparse's usage
    line, for its own refusals; ``prog``: another program name than ``tensorcut VERB``)."""
    prog = prog or f"tensorcut {argv[0]}"
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    errors = [ln for ln in err if ln.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: {msg}"), err
    assert err[-1] == errors[0] and all(ln.startswith("usage:") or ln[:1] == " " for ln in err[:-1])


@pytest.mark.parametrize("verb", ["train", "finetune"])
@pytest.mark.parametrize(
    "words,msg",
    [
        (["--lr", "0"], "--lr must be > 0, got 0"),
        (["--momentum", "1"], "--momentum must be in [0, 1), got 1"),
        (["--epochs", "-1"], "--epochs must be >= 0, got -1"),
        (["--seed", "-2"], "--seed must be in [0, 2**32), got -2"),
        (["--patience", "-1"], "--patience must be >= 0 (0 turns early stopping off), got -1"),
        (["--grad-clip", "-1"], "grad_clip must be >= 0 (0 or None: no clipping), got -1.0"),
        (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
        (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice: 'rmsprop'"),
        (["--scheduler"], "argument --scheduler: expected one argument"),
        (["--amp=yes"], "argument --amp/--no-amp: ignored explicit argument 'yes'"),
    ],
)
def test_bad_recipe_values_are_one_line_with_status_2(
    verb: str, words: list[str], msg: str, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "o"
    argv = [*BASE[verb][:-1], str(out), *words]
    _refused(capsys, argv, msg)
    assert not out.exists()


@pytest.mark.parametrize(
    "words,msg",
    [
        (["--distill-alpha", "2"], "--distill-alpha must be in [0, 1], got 2"),
        (["--distill-temperature", "0"], "distill_temperature must be > 0, got 0"),
    ],
)
def test_bad_distillation_values(words: list[str], msg: str, tmp_path: Path, capsys: Any) -> None:
    _refused(capsys, ["finetune", "ck", "--out", str(tmp_path / "o"), *words], msg)
    _refused(
        capsys,
        [*BASE["train"][:-1], str(tmp_path / "o"), *words],
        f"unrecognized arguments: {' '.join(words)}",
        prog="tensorcut",  # argparse's top-level parser reports flags no verb knows
    )


# ---------------------------------------------------------------------------------------- --out

#: The smallest command line of each verb with an --out, and its kind.
OUT_ARGV = {
    "train": (["--model", "vanilla-cnn", "--dataset", "digits"], "checkpoint"),
    "analyze": (["ck"], "results"),
    "plot": (["r.sqlite"], "figures"),
    "compress": (["ck", "--keep", "0.5"], "checkpoint"),
    "finetune": (["ck"], "checkpoint"),
    "export": (["ck", "--format", "onnx"], "file"),
    "run": (["ck", "--target-ratio", "3"], "run"),
    "demo": ([], "run"),
}


def test_every_out_is_declared_once_through_its_kind() -> None:
    parsers = verb_parsers(build_parser())
    with_out = {v for v, p in parsers.items() for a in p._actions if "--out" in a.option_strings}
    assert with_out == set(OUT_ARGV)
    for verb, (_, kind) in OUT_ARGV.items():
        p = parsers[verb]
        (act,) = [a for a in p._actions if "--out" in a.option_strings]
        k = OUT_KINDS[kind]
        assert p.get_default("out_kind") == kind
        assert act.metavar == k.metavar
        lead = k.what.split("{", 1)[0]
        assert act.help is not None and act.help.startswith(lead), (verb, act.help)


def test_out_help_is_consistent_in_the_reference() -> None:
    from tensorcut.cli.reference import cli_reference

    text = cli_reference()
    for kind in ("checkpoint", "run", "results", "figures", "file"):
        assert f"--out {OUT_KINDS[kind].metavar}" in text
    assert "--out OUT " not in text


@pytest.mark.parametrize("verb", sorted(OUT_ARGV))
def test_an_out_of_the_wrong_kind_is_refused_before_any_work(
    verb: str, tmp_path: Path, capsys: Any
) -> None:
    extra, kind = OUT_ARGV[verb]
    if OUT_KINDS[kind].directory:
        bad = tmp_path / "notes.txt"
        bad.write_text("mine")
        msg = f"{bad} is a file; give a directory path for --out"
    else:
        bad = tmp_path / "folder"
        bad.mkdir()
        msg = f"{bad} is a directory; give a file path for --out"
    assert main([verb, *extra, "--out", str(bad)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"tensorcut {verb}: error: {msg}"]
    assert bad.is_dir() or bad.read_text() == "mine"
