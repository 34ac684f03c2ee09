"""tensorcut.checkpoint.records: metrics, history and lineage records read as they were written."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tensorcut.checkpoint import (
    BatchNormRecord,
    EpochRecord,
    FinetuneRecord,
    Lineage,
    Metrics,
    Parent,
    Recipe,
    Score,
    TdlrtRecord,
)
from tensorcut.checkpoint.records import EDITED, read_history
from tensorcut.errors import TensorcutError


def test_a_record_writes_back_its_keys_in_their_order_with_unknown_ones() -> None:
    d = {"patience": None, "lr": 0.01, "future_option": [1, 2], "epochs": 3}
    r = Recipe.from_dict(d, "recipe")
    assert (r.epochs, r.lr, r.patience, r.momentum) == (3, 0.01, None, None)
    assert r.extra == {"future_option": [1, 2]}
    assert list(r.to_dict().items()) == list(d.items())  # same keys, same order, nothing added


def test_a_record_made_in_code_writes_every_field() -> None:
    rec = FinetuneRecord(
        epochs=2,
        optimizer="adam",
        lr=1e-5,
        patience=3,
        distill_from=None,
        subset=None,
        train_images=64,
    )
    assert rec.to_dict() == {
        "epochs": 2,
        "optimizer": "adam",
        "lr": 1e-5,
        "patience": 3,
        "distill_from": None,
        "subset": None,
        "train_images": 64,
    }
    assert FinetuneRecord.from_dict(rec.to_dict(), "finetune") == rec


def test_records_are_frozen() -> None:
    s = Score.from_dict({"loss": 0.3, "top1": 0.9}, "metrics.test")
    with pytest.raises(AttributeError):
        s.top1 = 1.0  # type: ignore[misc]


def test_an_older_record_without_newer_keys_round_trips() -> None:
    old_recipe = {  # before momentum and weight_decay were recorded
        "epochs": 10,
        "optimizer": "adam",
        "lr": 0.001,
        "scheduler": "plateau",
        "batch_size": 128,
        "augment": False,
        "patience": None,
    }
    old_finetune = {"epochs": 50, "optimizer": "adam", "lr": 1e-5, "patience": 3}
    old_finetune["distill_from"] = None  # before subset and train_images were recorded
    for cls, d in ((Recipe, old_recipe), (FinetuneRecord, old_finetune)):
        assert cls.from_dict(d, "x").to_dict() == d


def test_metrics_by_split() -> None:
    m = Metrics.from_dict(
        {"test": {"loss": 0.4, "top1": 0.9, "top5": 1.0, "n": 360}}, "metrics", "ck/meta.json"
    )
    assert "test" in m and "val" not in m and len(m) == 1 and list(m) == ["test"]
    assert m["test"].top1 == 0.9 and m.get("val") is None
    after = m.with_scores(test_before_finetune=Score(loss=2.0, top1=0.1, top5=0.5, n=360))
    assert list(after) == ["test", "test_before_finetune"] and list(m) == ["test"]
    assert Metrics.from_dict(after.to_dict(), "metrics") == after


def test_parent_keeps_a_null_metrics() -> None:
    d = {"path": "runs/dense", "metrics": None}
    p = Parent.from_dict(d)
    assert p == Parent("runs/dense", None) and p.to_dict() == d
    d2 = {"path": "runs/dense", "metrics": {}}
    assert Parent.from_dict(d2).to_dict() == d2 and Parent.from_dict(d2).metrics == Metrics()


def test_lineage_leaves_out_what_is_not_recorded() -> None:
    assert Lineage.from_meta({"model": {"name": "resnet20"}}) == Lineage()
    assert Lineage().to_meta() == {}
    meta = {
        "parent": {"path": "d", "metrics": None},
        "plan": {"format": "tensorcut-plan", "layers": []},
        "bn_recalibration": {"batchnorm_layers": 0, "default": True, "images": 0, "skipped": "x"},
        "tdlrt": {"tau": 0.1, "rmin": 2, "rmax": None, "final_ranks": {"conv1": [2, 3]}},
    }
    lin = Lineage.from_meta(meta)
    assert isinstance(lin.bn_recalibration, BatchNormRecord)
    assert lin.bn_recalibration.skipped == "x" and lin.recipe is None
    assert isinstance(lin.tdlrt, TdlrtRecord) and lin.tdlrt.final_ranks == {"conv1": [2, 3]}
    assert lin.to_meta() == meta


def test_history_rows_keep_their_extra_keys() -> None:
    rows = [
        {"epoch": 1, "train_loss": 1.2, "train_top1": 0.5, "lr": 0.01, "seconds": 1.5},
        {"epoch": 2, "train_loss": 0.9, "val_loss": 0.8, "ranks": {"c": [2, 2]}, "conv_cr": 3.1},
    ]
    hist = read_history(rows, "history", "meta.json", EDITED)
    assert hist is not None and [h.epoch for h in hist] == [1, 2]
    assert isinstance(hist[1], EpochRecord) and hist[1].val_loss == 0.8
    assert hist[1].extra == {"ranks": {"c": [2, 2]}, "conv_cr": 3.1}
    assert [h.to_dict() for h in hist] == rows
    assert read_history(None, "history", "meta.json", EDITED) is None


@pytest.mark.parametrize(
    ("cls", "value", "message"),
    [
        (Score, {"top1": 1.5}, "metrics.test.top1 must be a number in [0, 1], not 1.5"),
        (Score, {"n": 3.0}, "metrics.test.n must be a non-negative integer, not 3.0"),
        (Score, {"loss": True}, "metrics.test.loss must be a number, not True"),
        (Score, [0.3, 0.9], "metrics.test must be an object such as {"),
        (Recipe, {"augment": "no"}, "metrics.test.augment must be true or false, not 'no'"),
        (Recipe, {"patience": -1}, "metrics.test.patience must be a non-negative integer or null"),
        (FinetuneRecord, {"distill_from": 3}, "metrics.test.distill_from must be a string or null"),
    ],
)
def test_a_wrong_field_is_one_line_naming_it(cls: Any, value: Any, message: str) -> None:
    with pytest.raises(TensorcutError) as e:
        cls.from_dict(value, "metrics.test", "ck/meta.json")
    text = str(e.value)
    assert text.startswith("ck/meta.json: " + message), text
    assert text.endswith("; " + EDITED) and "\n" not in text


def test_a_long_value_is_shortened_in_the_message() -> None:
    with pytest.raises(TensorcutError) as e:
        Score.from_dict({"top1": "x" * 500}, "metrics.test")
    assert len(str(e.value)) < 200 and "..." in str(e.value)


def test_json_shapes_round_trip_through_json() -> None:
    """What a record writes is plain JSON: dumping and reading it back gives the same record."""
    d = {"batchnorm_layers": 4, "default": False, "requested": 64, "data": "train split"}
    d["images"] = 64
    rec = BatchNormRecord.from_dict(d, "bn_recalibration")
    assert BatchNormRecord.from_dict(json.loads(json.dumps(rec.to_dict())), "b") == rec


def test_layer_matching_record_round_trips_through_the_checkpoint_meta() -> None:
    from tensorcut.checkpoint import CheckpointMeta, MatchRecord

    rec = {"epochs": 3, "lr": 0.001, "images": 64, "steps": 6, "before": 0.3, "after": 0.1}
    meta = {"model": {"name": "resnet20", "kwargs": {}}, "layer_matching": dict(rec, bn_after=True)}
    cm = CheckpointMeta.from_meta(meta)
    assert isinstance(cm.lineage.layer_matching, MatchRecord)
    assert (cm.lineage.layer_matching.after, cm.lineage.layer_matching.bn_after) == (0.1, True)
    assert cm.to_meta() == meta and "layer_matching" not in cm.extra
    # a checkpoint written before layer matching existed: no record, same JSON back
    old = CheckpointMeta.from_meta({"model": {"name": "resnet20"}})
    assert old.lineage.layer_matching is None and "layer_matching" not in old.to_meta()
    with pytest.raises(TensorcutError) as e:
        CheckpointMeta.from_meta(dict(meta, layer_matching=dict(rec, steps=-1)))
    assert (
        str(e.value)
        == f"meta.json: layer_matching.steps must be a non-negative integer, not -1; {EDITED}"
    )
