"""The train/evaluate verbs as Python functions (``train/api.py``): the one-line refusals before
any work, and evaluation of a checkpoint on the data set it names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tensorcut import data, models
from tensorcut.checkpoint import CheckpointMeta, ModelSpec, Recipe
from tensorcut.errors import TensorcutError
from tensorcut.train.api import (
    check_dataset_fits,
    check_input_size,
    check_model_size,
    check_numbers,
    check_resume_recipe,
    evaluate_checkpoint,
    model_kwargs_for,
    recorded_recipe,
    resume_config,
    train_checkpoint,
)
from tensorcut.train.config import FitConfig


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """An untrained width-0.25 vanilla-cnn saved for digits, as ``train`` records it."""
    from tensorcut.checkpoint import io as tio

    kwargs = model_kwargs_for("digits", 0.25)
    torch.manual_seed(0)
    net = models.create("vanilla-cnn", **kwargs)
    meta = {
        "model": {"name": "vanilla-cnn", "kwargs": kwargs},
        "dataset": {"name": "digits", "val_fraction": 0.1, "seed": 0},
    }
    tio.save(net, tmp_path / "ck", meta)
    return tmp_path / "ck"


def test_model_kwargs_follow_the_data_set():
    assert model_kwargs_for("digits", 0.5) == {
        "num_classes": 10,
        "in_channels": 1,
        "width": 0.5,
        "input_size": 8,
    }


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"lr": float("inf")}, "--lr must be > 0, got inf"),
        ({"momentum": 1.0}, "--momentum must be in [0, 1), got 1"),
        ({"val_fraction": 1.0}, "--val-fraction must be in (0, 1), got 1"),
        ({"seed": 2**32}, "--seed must be in [0, 2**32), got 4.29497e+09"),
        ({"distill_alpha": 1.5}, "--distill-alpha must be in [0, 1], got 1.5"),
    ],
)
def test_check_numbers_names_the_flag(kw, msg):
    with pytest.raises(TensorcutError) as e:
        check_numbers(**kw)
    assert str(e.value) == msg


def test_check_numbers_skips_what_was_not_given():
    check_numbers(batch_size=None, lr=1e-3, momentum=0.0, subset=None)


def test_check_model_size_counts_without_building_weights():
    kwargs = model_kwargs_for("digits", 0.25)
    n = check_model_size("vanilla-cnn", kwargs)
    assert n == sum(p.numel() for p in models.create("vanilla-cnn", **kwargs).parameters())
    with pytest.raises(TensorcutError) as e:
        check_model_size("vanilla-cnn", {**kwargs, "width": 0})
    assert str(e.value) == "--width must be > 0, got 0"


def test_check_input_size_refuses_an_input_the_model_cannot_take():
    net = models.create("vanilla-cnn", **model_kwargs_for("digits", 0.25))
    check_input_size(net, (1, 8, 8))
    with pytest.raises(TensorcutError, match=r"^the model cannot take a 3x8x8 input: "):
        check_input_size(net, (3, 8, 8))


def test_check_dataset_fits_names_channels_and_size():
    ds = data.load_dataset("digits", "val")
    meta = {"model": {"name": "vanilla-cnn", "kwargs": {"in_channels": 3, "input_size": 8}}}
    with pytest.raises(TensorcutError) as e:
        check_dataset_fits(meta, ds, "digits")
    assert str(e.value) == (
        "digits images have 1 channels but the model expects 3; use the data set it was trained for"
    )
    meta = {"model": {"name": "vanilla-cnn", "kwargs": {"in_channels": 1, "input_size": 28}}}
    with pytest.raises(TensorcutError) as e:
        check_dataset_fits(meta, ds, "digits")
    assert str(e.value) == (
        "digits images are 8 px but this vanilla-cnn was built for 28 px; "
        "use the data set it was trained for"
    )
    check_dataset_fits({}, ds, "digits")  # nothing recorded: nothing to refuse
    check_dataset_fits(None, ds, "digits")


def test_check_dataset_fits_takes_the_typed_model_and_metadata():
    ds = data.load_dataset("digits", "val")
    wrong = ModelSpec("vanilla-cnn", {"in_channels": 3, "input_size": 8})
    for model in (wrong, CheckpointMeta(model=wrong)):
        with pytest.raises(TensorcutError, match="1 channels but the model expects 3"):
            check_dataset_fits(model, ds, "digits")
    check_dataset_fits(ModelSpec("resnet20", {"in_channels": 1, "input_size": 32}), ds, "digits")


def test_resume_recipe_must_match_the_recorded_one(tmp_path: Path):
    assert recorded_recipe(tmp_path) is None  # no checkpoint: no recipe
    check_resume_recipe(tmp_path, {"lr": 0.5})  # nothing recorded: nothing to keep
    (tmp_path / "meta.json").write_text(json.dumps({"recipe": {"lr": 0.001, "optimizer": "adam"}}))
    rec = recorded_recipe(tmp_path)
    assert isinstance(rec, Recipe) and rec.to_dict() == {"lr": 0.001, "optimizer": "adam"}
    check_resume_recipe(tmp_path, {"lr": 0.001, "epochs": 9})  # epochs may change
    check_resume_recipe(tmp_path, FitConfig(lr=0.001, momentum=0.5))  # momentum: not recorded
    with pytest.raises(TensorcutError) as e:
        check_resume_recipe(tmp_path, {"lr": 0.01, "optimizer": "sgd"})
    assert str(e.value) == (
        f"--resume continues {tmp_path} with its recorded recipe, but --optimizer adam -> sgd, "
        "--lr 0.001 -> 0.01; drop those options to resume, or train into a new --out"
    )
    with pytest.raises(TensorcutError, match=r"--lr 0.001 -> 0.1; drop those options"):
        check_resume_recipe(tmp_path, FitConfig(lr=0.1))


def test_recorded_recipe_refuses_an_edited_entry_in_one_line(tmp_path: Path):
    (tmp_path / "meta.json").write_text(json.dumps({"recipe": {"lr": "fast"}}))
    with pytest.raises(TensorcutError) as e:
        recorded_recipe(tmp_path)
    assert "recipe.lr must be a number, not 'fast'" in str(e.value)
    (tmp_path / "meta.json").write_text("{not json")
    assert recorded_recipe(tmp_path) is None  # unreadable: the loader says so in its own words


def test_resume_config_fills_the_optimiser_settings_from_the_recorded_recipe(tmp_path: Path):
    recipe = {"lr": 0.05, "optimizer": "sgd", "momentum": 0.8, "epochs": 99, "seed": 7}
    (tmp_path / "meta.json").write_text(json.dumps({"recipe": recipe}))
    base = FitConfig(epochs=3, scheduler="cosine")
    cfg = resume_config(tmp_path, base)
    assert (cfg.lr, cfg.optimizer, cfg.momentum) == (0.05, "sgd", 0.8)  # recorded
    assert (cfg.epochs, cfg.seed, cfg.scheduler) == (3, 0, "cosine")  # base: not recorded
    assert base == FitConfig(epochs=3, scheduler="cosine") and cfg is not base
    assert resume_config(tmp_path / "none") == FitConfig()  # nothing recorded: the base
    (tmp_path / "meta.json").write_text(json.dumps({"recipe": {"optimizer": "lbfgs"}}))
    with pytest.raises(TensorcutError, match="unknown optimizer 'lbfgs'"):
        resume_config(tmp_path)


def test_train_refuses_to_overwrite(checkpoint):
    with pytest.raises(TensorcutError, match="already holds a checkpoint; pass --resume"):
        train_checkpoint("vanilla-cnn", "digits", checkpoint, epochs=1)


def test_train_refuses_a_file_as_out(tmp_path: Path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(TensorcutError) as e:
        train_checkpoint("vanilla-cnn", "digits", f, epochs=1)
    assert str(e.value) == f"{f} is a file; give a directory path"


def test_evaluate_checkpoint_uses_the_recorded_data_set(checkpoint):
    """Evaluating the checkpoint directory equals evaluating its model on the split it names."""
    from tensorcut.checkpoint import io as tio
    from tensorcut.train.loop import evaluate

    got = evaluate_checkpoint(checkpoint, split="val", device="cpu")
    ck = tio.load_checkpoint(checkpoint)
    ds = data.load_dataset("digits", "val", val_fraction=0.1, seed=0)
    want = evaluate(ck.model, data.make_loader(ds, 512))
    assert got["n"] == want["n"] == len(ds)
    assert got["top1"] == pytest.approx(want["top1"]) and got["loss"] == pytest.approx(
        want["loss"], rel=1e-5
    )


def test_evaluate_a_module_needs_a_data_set():
    with pytest.raises(TensorcutError) as e:
        evaluate_checkpoint(nn.Sequential(nn.Flatten()), device="cpu")
    assert str(e.value) == "no data set given and the checkpoint does not name one; pass --dataset"


def test_train_resumed_without_a_config_keeps_the_recorded_recipe(tmp_path: Path):
    """The API fills a resumed recipe from the recorded one, as the CLI does: 2 epochs at SGD lr
    0.05, then resumed to 3 without a config continue at SGD lr 0.05 (not Adam 1e-3)."""
    out = tmp_path / "o"
    cfg = FitConfig(epochs=1, optimizer="sgd", lr=0.05, scheduler="none")
    kw = {"width": 0.25, "subset": 64, "device": "cpu", "progress": False}
    train_checkpoint("vanilla-cnn", "digits", out, epochs=1, config=cfg, **kw)
    ck = train_checkpoint("vanilla-cnn", "digits", out, epochs=2, resume=True, **kw)
    info = ck.info
    assert info.epoch == 2 and info.lineage.recipe is not None
    assert (info.lineage.recipe.optimizer, info.lineage.recipe.lr) == ("sgd", 0.05)
    assert [r.lr for r in info.history or ()] == [0.05, 0.05]
    with pytest.raises(TensorcutError, match="--optimizer sgd -> adam"):
        train_checkpoint("vanilla-cnn", "digits", out, epochs=3, config=FitConfig(), resume=True)
