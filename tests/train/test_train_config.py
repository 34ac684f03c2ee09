"""The training recipe (``train/config.py``): FitConfig's validation in the CLI's words, its
per-field help and choices, ``patience=0`` as "off", and the shared numeric rule table."""

import dataclasses
import re
import typing

import pytest

from tensorcut.errors import TensorcutError
from tensorcut.train.config import OPTIMIZERS, SCHEDULERS, FitConfig, check_numbers


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'"),
        ({"scheduler": "step"}, "unknown scheduler 'step'"),
        ({"lr": 0}, "--lr must be > 0, got 0"),
        ({"patience": -1}, "--patience must be >= 0 (0 turns early stopping off), got -1"),
        ({"patience": True}, "patience must be an integer >= 0 or None"),
        ({"patience": 2.0}, "patience must be an integer >= 0 or None"),
        ({"seed": "0"}, "seed must be an integer, got '0'"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"epochs": 2.0}, "epochs must be an integer, got 2.0"),
        ({"momentum": "0.9"}, "momentum must be a number, got '0.9'"),
        ({"grad_clip": -1.0}, "grad_clip must be >= 0"),
        ({"distill_temperature": 0.0}, "distill_temperature must be > 0"),
    ],
)
def test_bad_recipe(kw, msg):
    with pytest.raises(TensorcutError, match=re.escape(msg)):
        FitConfig(**kw)


@pytest.mark.parametrize(
    "field,flag,value",
    [
        ("momentum", "--momentum", 1.0),
        ("momentum", "--momentum", -0.1),
        ("weight_decay", "--weight-decay", -1e-4),
        ("seed", "--seed", -1),
        ("epochs", "--epochs", -1),
        ("lr", "--lr", 0.0),
        ("lr", "--lr", float("nan")),
    ],
)
def test_recipe_from_python_is_refused_in_the_cli_words(tmp_path, capsys, field, flag, value):
    """FitConfig built in Python refuses what the CLI refuses, with the CLI's message."""
    from tensorcut.cli import main

    with pytest.raises(TensorcutError) as e:
        FitConfig(**{field: value})
    argv = ["train", "--model", "vanilla-cnn", "--dataset", "digits", "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert main([*argv, flag, str(value)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tensorcut train: error: {e.value}"
    assert not (tmp_path / "o").exists()


def test_patience_zero_means_no_early_stopping():
    assert FitConfig(patience=0).patience is None
    assert dataclasses.replace(FitConfig(patience=3), patience=0).patience is None
    assert FitConfig(patience=2).patience == 2 and FitConfig().patience is None


def test_every_field_carries_its_help():
    for f in dataclasses.fields(FitConfig):
        text = f.metadata.get("help")
        assert isinstance(text, str) and text and "%" not in text, f.name
    none = {f.name: f.metadata.get("none") for f in dataclasses.fields(FitConfig)}
    assert none["patience"] == "no early stopping" and none["grad_clip"] == "no clipping"


def test_choices_are_literal_types():
    hints = typing.get_type_hints(FitConfig)
    assert typing.get_args(hints["optimizer"]) == OPTIMIZERS == ("adam", "sgd")
    assert typing.get_args(hints["scheduler"]) == SCHEDULERS
    assert SCHEDULERS == ("plateau", "cosine", "onecycle", "none")


def test_check_numbers_names_the_flag_and_skips_none():
    check_numbers(lr=None, epochs=0, patience=0)
    with pytest.raises(TensorcutError) as e:
        check_numbers(batch_size=0)
    assert str(e.value) == "--batch-size must be >= 1, got 0"
    with pytest.raises(KeyError):
        check_numbers(unknown=1)
