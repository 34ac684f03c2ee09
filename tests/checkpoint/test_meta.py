"""tensorcut.checkpoint.meta: the typed views of meta.json and the one data-set rule."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tensorcut import data as tdata
from tensorcut.checkpoint import CheckpointMeta, DatasetSpec, ModelSpec, Score
from tensorcut.checkpoint import io as tio
from tensorcut.errors import TensorcutError


def test_dataset_spec_reads_what_train_writes_and_round_trips() -> None:
    d = {"name": "digits", "data_dir": None, "val_fraction": 0.2, "seed": 3, "subset": 100}
    spec = DatasetSpec.from_meta({"dataset": d})
    assert spec == DatasetSpec("digits", None, 0.2, 3, 100)
    assert DatasetSpec.from_meta({"dataset": spec.to_dict()}) == spec


def test_an_old_checkpoint_without_a_dataset_asks_for_one() -> None:
    spec = DatasetSpec.from_meta({"model": {"name": "resnet20"}})
    assert spec == DatasetSpec()
    with pytest.raises(TensorcutError) as e:
        spec.load("val")
    assert str(e.value) == "the checkpoint does not name its data set; pass --dataset"


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        ("seed", "3", "a non-negative integer"),
        ("seed", -1, "a non-negative integer"),
        ("val_fraction", 1.5, "a number in [0, 1)"),
        ("subset", 0, "a positive integer or null"),
        ("name", "", "a data-set name"),
        ("data_dir", 7, "a folder path or null"),
    ],
)
def test_an_edited_field_is_one_line_naming_it(field: str, value: object, what: str) -> None:
    with pytest.raises(TensorcutError) as e:
        DatasetSpec.from_meta({"dataset": {"name": "digits", field: value}}, "ck/meta.json")
    assert str(e.value) == (
        f"ck/meta.json: dataset.{field} must be {what}, not {value!r}; the file was edited; "
        "restore it or correct that field"
    )


def test_dataset_must_be_an_object() -> None:
    with pytest.raises(TensorcutError, match=r'"dataset" must be an object'):
        DatasetSpec.from_meta({"dataset": "digits"})


def test_resolve_keeps_the_folder_only_for_the_recorded_data_set() -> None:
    spec = DatasetSpec("fashion-mnist", "/data/fm", 0.1, 0, None)
    assert spec.resolve() == spec
    assert spec.resolve("fashion-mnist") == spec
    assert spec.resolve("digits").data_dir is None  # another data set: its default location
    assert spec.resolve("digits", "/x").data_dir == "/x"  # an explicit folder wins
    assert spec.resolve(None, "/y") == DatasetSpec("fashion-mnist", "/y", 0.1, 0, None)


def test_load_is_the_recorded_split() -> None:
    """The same images as loading the split by hand with the recorded hold-out and seed."""
    spec = DatasetSpec("digits", None, 0.25, 5, None)
    got = spec.load("val", subset=40)
    want = tdata.load_dataset("digits", "val", val_fraction=0.25, seed=5, subset=40)
    assert len(got) == len(want) == 40
    xg = torch.stack([got[i][0] for i in range(len(got))])
    xw = torch.stack([want[i][0] for i in range(len(want))])
    assert torch.equal(xg, xw)


def test_model_spec() -> None:
    spec = ModelSpec.from_meta({"model": {"name": "resnet20", "kwargs": {"width": 0.25}}})
    assert spec.to_dict() == {"name": "resnet20", "kwargs": {"width": 0.25}}
    net = spec.create()
    assert sum(p.numel() for p in net.parameters()) > 0
    with pytest.raises(TensorcutError) as e:
        ModelSpec.from_meta({"model": {"kwargs": {}}}, "ck/meta.json")
    assert str(e.value) == "ck/meta.json lacks model.name; it cannot be rebuilt"
    with pytest.raises(TensorcutError, match=r"model.kwargs must be an object, not list"):
        ModelSpec.from_meta({"model": {"name": "resnet20", "kwargs": [1]}})


def test_model_spec_input_shape() -> None:
    assert ModelSpec("resnet20").input_shape() == (3, 32, 32)
    assert ModelSpec("vanilla-cnn", {"in_channels": 1, "input_size": 8}).input_shape() == (1, 8, 8)


# ----------------------------------------------------------------------------- CheckpointMeta


def _meta(d: Path) -> dict[str, Any]:
    return json.loads((d / "meta.json").read_text())


@pytest.fixture(scope="module")
def written(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints as tensorcut writes them: trained, compressed (BatchNorm record, evaluated),
    fine-tuned, and trained with TDLRT."""
    from tensorcut.compression import CompressConfig
    from tensorcut.pipeline.workflow import compress_checkpoint, finetune_checkpoint
    from tensorcut.train.config import FitConfig
    from tensorcut.train.tdlrt_verb import train_tdlrt_checkpoint

    root = tmp_path_factory.mktemp("written")
    compress_checkpoint(
        tiny_checkpoint,
        root / "compressed",
        CompressConfig(method="tucker2", ratio=0.5),
        evaluate_split="val",
        bn_images=64,
        progress=False,
    )
    finetune_checkpoint(
        root / "compressed",
        root / "finetuned",
        config=FitConfig(epochs=1, lr=1e-4, scheduler="none"),
        subset=64,
        batch_size=32,
        device="cpu",
        progress=False,
    )
    train_tdlrt_checkpoint(
        "vanilla-cnn",
        "digits",
        root / "tdlrt",
        tau=0.2,
        init_rank=2,
        epochs=1,
        width=0.125,
        subset=32,
        batch_size=16,
        device="cpu",
        optimizer="sgd",
        lr=0.05,
        scheduler="none",
        progress=False,
    )
    return {
        "dense": tiny_checkpoint,
        "compressed": root / "compressed",
        "finetuned": root / "finetuned",
        "tdlrt": root / "tdlrt",
    }


@pytest.mark.parametrize("kind", ["dense", "compressed", "finetuned", "tdlrt"])
def test_round_trip_of_every_written_checkpoint(written: dict[str, Path], kind: str) -> None:
    d = _meta(written[kind])
    info = CheckpointMeta.from_meta(d, written[kind] / "meta.json")
    assert info.to_meta() == d
    assert json.dumps(info.to_meta(), sort_keys=True) == json.dumps(d, sort_keys=True)
    assert CheckpointMeta.from_meta(info.to_meta()) == info
    assert tio.read_info(written[kind]) == info == tio.load_checkpoint(written[kind]).info


def test_typed_lineage_metrics_and_history(written: dict[str, Path]) -> None:
    dense = tio.read_info(written["dense"])
    comp = tio.read_info(written["compressed"])
    ft = tio.read_info(written["finetuned"])
    tdlrt = tio.read_info(written["tdlrt"])
    assert dense.model.name == "vanilla-cnn" and dense.dataset.name == "digits"
    assert dense.history is not None and len(dense.history) == dense.epoch == 1
    assert dense.lineage.recipe is not None and dense.lineage.recipe.epochs == 1
    assert isinstance(dense.score("test"), Score) and dense.lineage.parent is None
    # compressed: made from the dense checkpoint, whose metrics it records; history dropped
    assert comp.lineage.parent is not None
    assert comp.lineage.parent.path == str(written["dense"])
    assert comp.lineage.parent.metrics == dense.metrics
    assert comp.lineage.plan is not None and comp.lineage.plan["format"] == "tensorcut-plan"
    assert comp.lineage.recipe == dense.lineage.recipe and comp.history is None
    bn = comp.lineage.bn_recalibration
    assert bn is not None and bn.images == 64 and bn.default is False
    assert comp.metrics is not None and list(comp.metrics) == ["val"]
    # fine-tuned: its parent's lineage, the fine-tuning record and the before/after scores
    assert ft.lineage.parent == comp.lineage.parent and ft.lineage.plan == comp.lineage.plan
    assert ft.lineage.finetune is not None and ft.lineage.finetune.train_images == 64
    assert ft.metrics is not None
    assert sorted(ft.metrics) == ["test", "test_before_finetune", "val"]  # meta.json sorts keys
    assert ft.finetune_history is not None and [r.epoch for r in ft.finetune_history] == [1]
    assert ft.history is None
    t = tdlrt.lineage.tdlrt
    assert t is not None and (t.tau, t.init_rank, t.init_from) == (0.2, 2, None)
    assert tdlrt.lineage.recipe is not None and tdlrt.lineage.recipe.method == "tdlrt"


def test_compress_and_finetune_write_what_they_wrote_before(written: dict[str, Path]) -> None:
    """meta.json as the dict-editing code wrote it: the source's, its history dropped, with
    parent / plan / metrics / bn_recalibration (compress) and finetune / metrics /
    finetune_history (finetune)."""
    dense, comp, ft = (_meta(written[k]) for k in ("dense", "compressed", "finetuned"))
    want = copy.deepcopy(dense)
    want.pop("history")
    want["parent"] = {"path": str(written["dense"]), "metrics": dense["metrics"]}
    for key in ("plan", "metrics", "bn_recalibration", "layers"):
        want[key] = comp[key]
    assert comp == want
    want = copy.deepcopy(comp)
    want["finetune"] = {
        "epochs": 1,
        "optimizer": "adam",
        "lr": 1e-4,
        "patience": None,
        "distill_from": None,
        "subset": 64,
        "train_images": 64,
    }
    want["metrics"] = dict(
        comp["metrics"],
        test_before_finetune=ft["metrics"]["test_before_finetune"],
        test=ft["metrics"]["test"],
    )
    want["finetune_history"] = ft["finetune_history"]
    assert ft == want


#: meta.json as the first release wrote it (no momentum / weight_decay in the recipe, no
#: versions), then a compressed and a fine-tuned checkpoint of that time
OLD_DENSE = {
    "format": "tensorcut-checkpoint",
    "format_version": 1,
    "layers": {},
    "model": {"name": "vanilla-cnn", "kwargs": {"in_channels": 1, "input_size": 8}},
    "dataset": {"name": "digits", "val_fraction": 0.1, "seed": 0, "data_dir": None, "subset": 256},
    "recipe": {
        "epochs": 1,
        "optimizer": "adam",
        "lr": 0.002,
        "scheduler": "plateau",
        "batch_size": 64,
        "augment": False,
        "patience": None,
    },
    "history": [{"epoch": 1, "train_loss": 2.1, "train_top1": 0.3, "lr": 0.002, "seconds": 0.5}],
    "epoch": 1,
    "metrics": {"test": {"loss": 2.0, "top1": 0.35, "top5": 0.8, "n": 360}},
}
OLD_FINETUNED = dict(
    {k: v for k, v in OLD_DENSE.items() if k != "history"},
    parent={"path": "runs/dense", "metrics": OLD_DENSE["metrics"]},
    plan={"format": "tensorcut-plan", "version": 1, "layers": []},
    finetune={"epochs": 1, "optimizer": "adam", "lr": 1e-5, "patience": 3, "distill_from": None},
    metrics={
        "test_before_finetune": {"loss": 2.2, "top1": 0.3},
        "test": {"loss": 2.0, "top1": 0.4},
    },
    finetune_history=[{"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "val_top1": 0.4}],
)


@pytest.mark.parametrize(
    "old",
    [
        OLD_DENSE,
        OLD_FINETUNED,
        {"model": {"name": "resnet20", "kwargs": {}}},  # tensorcut.save(model, dir, meta) by hand
        {"model": {"name": "vanilla-cnn", "kwargs": {}}, "mine": {"note": "kept as it is"}},
    ],
    ids=["first-release-dense", "first-release-finetuned", "python-api", "unknown-keys"],
)
def test_older_shapes_read_and_write_back_unchanged(old: dict[str, Any]) -> None:
    info = CheckpointMeta.from_meta(copy.deepcopy(old))
    assert info.to_meta() == old


def test_a_bare_checkpoint_has_no_lineage_metrics_or_history() -> None:
    info = CheckpointMeta.from_meta({"model": {"name": "resnet20"}})
    assert info.dataset == DatasetSpec() and info.metrics is None and info.score("test") is None
    assert info.history is None and info.finetune_history is None and info.epoch is None
    assert info.lineage.parent is None and info.lineage.plan is None
    assert info.to_meta() == {"model": {"name": "resnet20", "kwargs": {}}}  # kwargs: normalised


def test_an_old_checkpoint_still_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    d = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, d)
    meta = _meta(d)
    for key in ("momentum", "weight_decay"):
        meta["recipe"].pop(key)
    meta.pop("versions")
    (d / "meta.json").write_text(json.dumps(meta))
    ck = tio.load_checkpoint(d)
    assert ck.info.lineage.recipe is not None and ck.info.lineage.recipe.momentum is None
    assert ck.info.to_meta() == meta


def _edit(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set the (dotted, [i]-indexed) ``key`` of a meta dict to ``value``."""

    def edit(meta: dict[str, Any]) -> None:
        *path, last = key.replace("[", ".").replace("]", "").split(".")
        obj: Any = meta
        for k in path:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        obj[int(last) if isinstance(obj, list) else last] = value

    return edit


#: hand edits of a fine-tuned checkpoint's meta.json: (field, value, what it must be)
BAD_FIELDS = [
    ("metrics", [0.9], None),
    ("metrics.test", 0.91, None),
    ("metrics.test.top1", "0.91", "a number in [0, 1]"),
    ("metrics.test.top1", 91.0, "a number in [0, 1]"),
    ("metrics.test.n", -1, "a non-negative integer"),
    ("metrics.test_before_finetune.loss", None, "a number"),
    ("history", {"epoch": 1}, "a list of epoch records"),
    ("finetune_history", "1 epoch", "a list of epoch records"),
    ("finetune_history[0]", [1], None),
    ("finetune_history[0].epoch", "1", "a non-negative integer"),
    ("finetune_history[0].val_top1", 2, "a number in [0, 1]"),
    ("epoch", 1.5, "a non-negative integer"),
    ("parent", "runs/dense", None),
    ("parent.path", None, "a checkpoint path"),
    ("parent.metrics", "good", None),
    ("parent.metrics.test.top5", "high", "a number in [0, 1]"),
    ("plan", "tucker2", None),
    ("recipe.lr", "1e-3", "a number"),
    ("recipe.augment", 1, "true or false"),
    ("recipe.patience", "3", "a non-negative integer or null"),
    ("finetune.epochs", -2, "a non-negative integer"),
    ("finetune.distill_from", 0, "a string or null"),
    ("bn_recalibration.default", "yes", "true or false"),
    ("bn_recalibration.images", 6.4, "a non-negative integer or null"),
    ("tdlrt", [], None),
]


def _expected(source: str, key: str, value: Any, what: str | None) -> str:
    tail = "the file was edited; restore it or correct that field"
    if what is None:  # a whole record of the wrong type: its own line, with an example
        return f"{source}: {key} must be an object such as "
    return f"{source}: {key} must be {what}, not {value!r}; {tail}"


@pytest.mark.parametrize(("key", "value", "what"), BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_each_edited_field_is_one_line_naming_it(key: str, value: Any, what: str | None) -> None:
    meta = copy.deepcopy(OLD_FINETUNED)
    meta["history"] = copy.deepcopy(OLD_DENSE["history"])
    meta["bn_recalibration"] = {"batchnorm_layers": 2, "default": True, "images": 64}
    _edit(key, value)(meta)
    with pytest.raises(TensorcutError) as e:
        CheckpointMeta.from_meta(meta, "ck/meta.json")
    msg = str(e.value)
    assert "\n" not in msg
    if what is None:
        assert msg.startswith(_expected("ck/meta.json", key, value, what)), msg
        assert msg.endswith(
            f"not {type(value).__name__} {value!r}; the file was edited; "
            "restore it or correct that field"
        ), msg
    else:
        assert msg == _expected("ck/meta.json", key, value, what)


def test_the_model_and_data_set_messages_are_unchanged() -> None:
    with pytest.raises(TensorcutError) as e:
        CheckpointMeta.from_meta({"dataset": {"name": "digits"}}, "ck/meta.json")
    assert str(e.value) == "ck/meta.json lacks model.name; it cannot be rebuilt"
    with pytest.raises(TensorcutError) as e:
        CheckpointMeta.from_meta({"model": {"name": "x"}, "dataset": {"seed": -1}}, "ck/meta.json")
    assert str(e.value) == (
        "ck/meta.json: dataset.seed must be a non-negative integer, not -1; the file was edited; "
        "restore it or correct that field"
    )


def test_an_edited_field_refuses_the_load_naming_the_file(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    d = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, d)
    meta = _meta(d)
    meta["metrics"]["test"]["top1"] = "91%"
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TensorcutError) as e:
        tio.load_checkpoint(d)
    assert str(e.value) == (
        f"{d / 'meta.json'}: metrics.test.top1 must be a number in [0, 1], not '91%'; the file "
        "was edited; restore it or correct that field"
    )
