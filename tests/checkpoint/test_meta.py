"""tensorcut.checkpoint.meta: the typed views of meta.json and the one data-set rule."""

from __future__ import annotations

import pytest
import torch

from tensorcut import data as tdata
from tensorcut.checkpoint import DatasetSpec, ModelSpec
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
