"""TDLRT on checkpoints (``train/tdlrt_verb.py``): refusals before any work, a checkpoint that
records the settings and final ranks and reloads to the same outputs, and the CLI entry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from tensorcut.checkpoint import io as tio
from tensorcut.cli import build_parser
from tensorcut.errors import TensorcutError
from tensorcut.train.tdlrt_verb import train_tdlrt_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py

TINY = {"epochs": 1, "width": 0.25, "subset": 64, "batch_size": 32, "device": "cpu"}


def test_refusals_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(TensorcutError) as e:
        train_tdlrt_checkpoint(None, "digits", tmp_path / "o", tau=0.1, **TINY)
    assert str(e.value) == (
        "name a zoo model with --model, or a checkpoint to start from with --init-from"
    )
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "meta.json").write_text("{}")
    with pytest.raises(TensorcutError) as e:
        train_tdlrt_checkpoint("vanilla-cnn", "digits", tmp_path / "held", tau=0.1, **TINY)
    assert str(e.value) == (
        f"{tmp_path / 'held'} already holds a checkpoint; TDLRT runs cannot be resumed, choose "
        "another --out"
    )


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    argv = ["train", "--model", "vanilla-cnn", "--dataset", "digits", "--out", str(tmp_path / "o")]
    a = build_parser().parse_args([*argv, "--method", "tdlrt", *extra])
    for k, v in {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}.items():
        setattr(a, k, v)
    a.scheduler = "none"
    return a


def test_cli_entry_refuses_missing_tau_and_resume(tmp_path: Path) -> None:
    with pytest.raises(TensorcutError) as e:
        (a := _args(tmp_path)).func(a)
    assert str(e.value) == "--method tdlrt needs --tau (relative truncation tolerance, e.g. 0.1)"
    with pytest.raises(TensorcutError) as e:
        (a := _args(tmp_path, "--tau", "0.1", "--resume")).func(a)
    assert str(e.value) == (
        "--resume is not supported with --method tdlrt; start a new run with another --out"
    )
    assert not (tmp_path / "o").exists()


def test_one_epoch_writes_a_checkpoint_that_reloads(tmp_path: Path, capsys) -> None:
    from tensorcut.cli import main

    argv = ["train", "--model", "vanilla-cnn", "--dataset", "digits", "--out", str(tmp_path / "o")]
    argv += ["--method", "tdlrt", "--tau", "0.2", "--init-rank", "2", "--epochs", "1"]
    argv += ["--width", "0.125", "--subset", "32", "--batch-size", "16", "--device", "cpu"]
    argv += ["--optimizer", "sgd", "--lr", "0.05", "--scheduler", "none", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["checkpoint"] == str(tmp_path / "o") and doc["epochs"] == 1
    ck = tio.load_checkpoint(tmp_path / "o")
    t = ck.meta["tdlrt"]
    assert (t["tau"], t["init_rank"], t["init_from"]) == (0.2, 2, None)
    assert t["final_ranks"] and t["conv_cr"] == pytest.approx(doc["conv_cr"])
    assert ck.meta["recipe"]["method"] == "tdlrt" and ck.meta["dataset"]["subset"] == 32
    assert ck.meta["metrics"]["test"] == doc["test"] and len(ck.meta["history"]) == 1
    x = torch.randn(3, 1, 8, 8)
    again = tio.load_checkpoint(tmp_path / "o").model
    with torch.no_grad():
        torch.testing.assert_close(again(x), ck.model(x), atol=0, rtol=0)
