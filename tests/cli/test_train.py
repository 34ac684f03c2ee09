"""The ``train`` and ``evaluate`` verbs' parser layer (``train/cli.py``): flags, defaults, the
recipe filled from the defaults or the recorded run, one-line errors with status 2, and the
mapping of flags onto the training API (stubbed here; it is tested in test_api.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import tensorcut.train.api as api
import tensorcut.train.tdlrt_verb as tdlrt_verb
from tensorcut.checkpoint.io import Checkpoint
from tensorcut.cli import build_parser, main
from tensorcut.cli.train import train_config
from tensorcut.train.api import RESUME_KEYS
from tensorcut.train.config import FitConfig

MODEL = {"name": "vanilla-cnn", "kwargs": {"width": 0.25}}

BASE = ["train", "--model", "vanilla-cnn", "--dataset", "digits"]


def test_train_defaults_leave_the_recipe_unset_until_resolved(tmp_path: Path) -> None:
    a = build_parser().parse_args([*BASE, "--out", str(tmp_path / "o")])
    assert (a.width, a.batch_size, a.val_fraction) == (1.0, 128, 0.1)
    assert (a.method, a.device, a.subset) == ("dense", "auto", None)
    assert all(getattr(a, f.name, None) is None for f in dataclasses.fields(FitConfig))
    assert train_config(a) == FitConfig()  # unset: FitConfig's defaults


def test_resume_takes_the_recorded_recipe_for_unset_options(tmp_path: Path) -> None:
    recipe = {"lr": 0.05, "optimizer": "sgd", "epochs": 99, "seed": 7}
    (tmp_path / "meta.json").write_text(json.dumps({"recipe": recipe}))
    a = build_parser().parse_args([*BASE, "--out", str(tmp_path), "--resume", "--momentum", "0.5"])
    cfg = train_config(a)
    assert (cfg.lr, cfg.optimizer, cfg.momentum) == (0.05, "sgd", 0.5)  # given flags win
    assert cfg.scheduler == FitConfig().scheduler  # not recorded: the default
    assert (cfg.epochs, cfg.seed) == (10, 0)  # only the optimiser state's settings are recorded
    assert set(RESUME_KEYS) == {"optimizer", "lr", "momentum", "weight_decay", "scheduler"}
    a = build_parser().parse_args([*BASE, "--out", str(tmp_path), "--lr", "0.2"])
    assert train_config(a).lr == 0.2 and train_config(a).optimizer == "adam"  # no --resume


def test_flags_reach_the_training_api(monkeypatch, tmp_path: Path, capsys) -> None:
    seen: dict[str, Any] = {}

    def fake_train(model: str, dataset: str, out: Any, **kw: Any) -> Any:
        seen.update(model=model, dataset=dataset, out=out, **kw)
        test = {"loss": 0.5, "top1": 0.75, "top5": 1.0, "n": 4}
        return Checkpoint(nn.Identity(), {"model": MODEL, "metrics": {"test": test}, "epoch": 3})

    monkeypatch.setattr(api, "train_checkpoint", fake_train)
    out = str(tmp_path / "o")
    argv = [*BASE, "--out", out, "--epochs", "3", "--lr", "0.01", "--optimizer", "sgd"]
    assert main([*argv, "--patience", "2", "--augment", "--subset", "64"]) == 0
    cfg = seen["config"]
    assert (cfg.epochs, cfg.lr, cfg.optimizer, cfg.patience, cfg.scheduler) == (
        3, 0.01, "sgd", 2, "plateau",
    )  # fmt: skip
    assert (seen["model"], seen["dataset"], seen["out"], seen["subset"]) == (
        "vanilla-cnn", "digits", out, 64,
    )  # fmt: skip
    assert seen["augment"] and not seen["resume"]
    assert capsys.readouterr().out.splitlines() == [
        "test: loss 0.5000  top-1 0.7500  top-5 1.0000  (n=4)",
        f"checkpoint: {out}",
    ]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "checkpoint": out,
        "test": {"loss": 0.5, "top1": 0.75, "top5": 1.0, "n": 4},
        "epochs": 3,
    }


def test_tdlrt_reports_its_typed_record(monkeypatch, tmp_path: Path, capsys) -> None:
    def fake(model: str, dataset: str, out: Any, **kw: Any) -> Checkpoint:
        meta = {
            "model": MODEL,
            "metrics": {"test": {"loss": 0.25, "top1": 0.5, "top5": 0.75, "n": 8}},
            "epoch": 2,
            "tdlrt": {"tau": 0.1, "rmin": 2, "conv_cr": 2.5, "conv_compression_pct": 60.0},
        }
        return Checkpoint(nn.Identity(), meta)

    monkeypatch.setattr(tdlrt_verb, "train_tdlrt_checkpoint", fake)
    out = str(tmp_path / "o")
    argv = [*BASE, "--method", "tdlrt", "--tau", "0.1", "--out", out]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        "test: loss 0.2500  top-1 0.5000  top-5 0.7500  (n=8)",
        "conv compression 60.0% (CR 2.50)",
        f"checkpoint: {out}",
    ]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "checkpoint": out,
        "test": {"loss": 0.25, "top1": 0.5, "top5": 0.75, "n": 8},
        "epochs": 2,
        "conv_cr": 2.5,
        "conv_compression_pct": 60.0,
    }


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--val-fraction", "1"], "--val-fraction must be in (0, 1), got 1"),
        (["--width", "-1"], "--width must be > 0, got -1"),
    ],
)
def test_bad_numbers_are_one_line_before_any_work(extra, msg, tmp_path: Path, capsys) -> None:
    assert main([*BASE, "--out", str(tmp_path / "o"), *extra]) == 2
    assert capsys.readouterr().err.strip() == f"tensorcut train: error: {msg}"
    assert not (tmp_path / "o").exists()


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "digits", "--out", "o"])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "tensorcut train: error: the following arguments are required: --model"
    with pytest.raises(SystemExit):
        main([*BASE, "--out", "o", "--method", "cp"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("tensorcut train: error: argument --method: invalid choice: 'cp'")


def test_evaluate_verb(monkeypatch, capsys) -> None:
    seen: dict[str, Any] = {}

    def fake(checkpoint: Any, dataset: Any, split: str, **kw: Any) -> dict[str, float]:
        seen.update(checkpoint=checkpoint, dataset=dataset, split=split, **kw)
        return {"loss": 1.0, "top1": 0.5, "top5": 0.875, "n": 8}

    monkeypatch.setattr(api, "evaluate_checkpoint", fake)
    assert main(["evaluate", "ck", "--split", "val", "--subset", "8"]) == 0
    assert (seen["checkpoint"], seen["dataset"], seen["split"], seen["subset"]) == (
        "ck", None, "val", 8,
    )  # fmt: skip
    assert capsys.readouterr().out.strip() == "val: loss 1.0000  top-1 0.5000  top-5 0.8750  (n=8)"
    assert main(["evaluate", "ck", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top5"] == 0.875 and seen["split"] == "test"


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--patience", "2"], "--patience"),
        (["--amp"], "--amp"),
        (["--sync-bn"], "--sync-bn"),
        (["--grad-clip", "1.0"], "--grad-clip"),
    ],
)
def test_tdlrt_refuses_recipe_flags_it_cannot_honour(extra, flag, tmp_path: Path, capsys) -> None:
    """``train --method tdlrt`` used to ignore these silently; now one line, status 2, no work."""
    out = tmp_path / "o"
    rc = main([*BASE, "--method", "tdlrt", "--tau", "0.1", "--out", str(out), *extra])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        f"tensorcut train: error: {flag} is not used by --method tdlrt (its integrator trains "
        "without early stopping, autocast, SyncBatchNorm or gradient clipping); drop it"
    )
    assert not out.exists()


def test_tdlrt_accepts_the_negative_forms(monkeypatch, tmp_path: Path) -> None:
    """``--no-amp`` asks for nothing tdlrt lacks: it reaches the TDLRT verb."""
    import tensorcut.train.tdlrt_verb as verb

    seen: dict[str, Any] = {}

    def stub(*a: Any, **k: Any) -> Any:
        seen.update(k)
        raise SystemExit(0)

    monkeypatch.setattr(verb, "train_tdlrt_checkpoint", stub)
    with pytest.raises(SystemExit):
        main([*BASE, "--method", "tdlrt", "--tau", "0.1", "--out", str(tmp_path / "o"), "--no-amp"])
    assert seen["tau"] == 0.1


@pytest.mark.parametrize(
    "extra,recipe",
    [
        ([], ("sgd", 0.1, 0.9, 0.0, "cosine")),
        (["--optimizer", "adam"], ("adam", 3e-3, 0.9, 0.0, "cosine")),
        (["--lr", "0.02", "--scheduler", "none"], ("sgd", 0.02, 0.9, 0.0, "none")),
        (["--optimizer", "adam", "--lr", "1e-3"], ("adam", 1e-3, 0.9, 0.0, "cosine")),
        (["--weight-decay", "5e-4", "--momentum", "0.8"], ("sgd", 0.1, 0.8, 5e-4, "cosine")),
    ],
)
def test_tdlrt_runs_its_own_recipe_unless_flags_are_given(
    extra, recipe, monkeypatch, tmp_path: Path
) -> None:
    """Not the dense Adam 1e-3 (2 points under dense in bench_tdlrt): SGD 0.1 cosine, Adam 3e-3."""
    import tensorcut.train.tdlrt_verb as verb

    seen: dict[str, Any] = {}

    def stub(*a: Any, **k: Any) -> Any:
        seen.update(k)
        raise SystemExit(0)

    monkeypatch.setattr(verb, "train_tdlrt_checkpoint", stub)
    with pytest.raises(SystemExit):
        main([*BASE, "--method", "tdlrt", "--tau", "0.1", "--out", str(tmp_path / "o"), *extra])
    keys = ("optimizer", "lr", "momentum", "weight_decay", "scheduler")
    assert tuple(seen[k] for k in keys) == recipe
