"""Checkpoints: save/load round trip, atomic writes, and every kind of bad checkpoint."""

import json
import pickle

import pytest
import torch

from tensorcut import models
from tensorcut.checkpoint import io as tio
from tensorcut.errors import TensorcutError


def _save_tiny(tmp_path):
    m = models.create("resnet20", width=0.25).eval()
    meta = {"model": {"name": "resnet20", "kwargs": {"width": 0.25}}}
    tio.save(m, tmp_path / "ck", meta)
    return m, tmp_path / "ck"


def test_round_trip_gives_identical_outputs(tmp_path):
    m, d = _save_tiny(tmp_path)
    loaded = tio.load(d)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))
    meta = json.loads((d / "meta.json").read_text())
    assert meta["format"] == "tensorcut-checkpoint" and "torch" in meta["versions"]


def test_atomic_write_leaves_no_temp_files(tmp_path):
    tio.atomic_write_text(tmp_path / "a.txt", "one")
    tio.atomic_write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tio.os, "replace", boom)
    with pytest.raises(TensorcutError, match="cannot write .*keep.txt: No space left on device"):
        tio.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_truncated_weights(tmp_path):
    _, d = _save_tiny(tmp_path)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(TensorcutError, match="model.safetensors is truncated or corrupt"):
        tio.load(d)


def test_pickle_weights_are_never_unpickled(tmp_path):
    _, d = _save_tiny(tmp_path)
    (d / "model.safetensors").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(TensorcutError, match="truncated or corrupt"):
        tio.load(d)


def test_meta_disagreeing_with_weights(tmp_path):
    _, d = _save_tiny(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    meta["model"]["kwargs"]["width"] = 0.5
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TensorcutError, match=r"weights do not match meta.json \(.*of wrong shape"):
        tio.load(d)


def test_corrupt_or_foreign_meta(tmp_path):
    _, d = _save_tiny(tmp_path)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(TensorcutError, match="meta.json is corrupt"):
        tio.load(d)
    (d / "meta.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(TensorcutError, match="is not tensorcut checkpoint metadata"):
        tio.load(d)


def test_missing_directory_and_unknown_model(tmp_path):
    with pytest.raises(TensorcutError, match="is not a checkpoint directory"):
        tio.load(tmp_path / "nope")
    _, d = _save_tiny(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    meta["model"]["name"] = "resnet9000"
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        TensorcutError,
        match="checkpoint of model 'resnet9000', which is not in tensorcut's model registry",
    ):
        tio.load(d)


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        tio.atomic_write_text(tmp_path / "m.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "m.txt").stat().st_mode & 0o777 == 0o644


# -------------------------------------------------------------------- every layer type, user models


class _UserNet(torch.nn.Module):
    """An architecture tensorcut's registry does not know, with a shared conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 12, 3, padding=1)
        self.body = torch.nn.Conv2d(12, 12, 3, padding=1)
        self.again = self.body
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.again(torch.relu(self.body(torch.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def test_user_model_reloads_with_a_fresh_instance(tmp_path):
    from tensorcut.compression import compress
    from tensorcut.layers.base import FactorizedConv2d

    torch.manual_seed(0)
    m, _ = compress(
        _UserNet().eval(), method="tucker2", ratio=0.6, input_shape=(3, 8, 8), progress=False
    )
    assert isinstance(m.body, FactorizedConv2d)
    tio.save(m, tmp_path / "mine")
    with pytest.raises(
        TensorcutError,
        match=r"^checkpoint of model '_UserNet', which is not in tensorcut's model registry: "
        r"pass a fresh instance of the architecture, tensorcut.load\(path, model=_UserNet\(...\)\)",
    ):
        tio.load(tmp_path / "mine")
    back = tio.load(tmp_path / "mine", model=_UserNet())
    assert isinstance(back.body, FactorizedConv2d) and back.body is back.again
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


@pytest.mark.parametrize("method", ["cp", "tr", "tt", "tucker", "tucker2", "svd"])
def test_every_layer_type_round_trips(tmp_path, method):
    from tensorcut.compression import compress
    from tensorcut.layers.linear import SVDLinear

    torch.manual_seed(0)
    m = models.create("resnet20", width=0.25).eval()
    if method == "svd":
        m.linear = SVDLinear.from_linear(m.linear, rank=3)
    else:
        compress(
            m,
            method=method,
            ratio=0.5,
            input_shape=(3, 32, 32),
            layers=["layer3.0.conv2"],
            progress=False,
        )
    tio.save(m, tmp_path / "ck", {"model": {"name": "resnet20", "kwargs": {"width": 0.25}}})
    back = tio.load(tmp_path / "ck")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    assert [type(s).__name__ for s in back.modules()] == [type(s).__name__ for s in m.modules()]


def test_integer_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _, d = _save_tiny(tmp_path)
    state = load_file(d / "model.safetensors")
    state = {k: (v.to(torch.int32) if v.is_floating_point() else v) for k, v in state.items()}
    save_file(state, d / "model.safetensors")
    with pytest.raises(
        TensorcutError,
        match=r"tensor\(s\) hold torch.int32 values where the model has floating-point weights",
    ):
        tio.load(d)


def test_unserialisable_meta_leaves_nothing_half_written(tmp_path):
    m = models.create("resnet20", width=0.25)
    with pytest.raises(TensorcutError, match="^checkpoint metadata is not JSON-serialisable"):
        tio.save(m, tmp_path / "ck", {"model": {"name": "resnet20", "kwargs": {"width": ...}}})
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


def test_save_refuses_metadata_load_would_refuse_and_writes_nothing(tmp_path):
    m = models.create("resnet20", width=0.25)
    meta = {"model": {"name": "resnet20", "kwargs": {"width": 0.25}}, "metrics": {"top1": 0.9}}
    with pytest.raises(TensorcutError) as e:
        tio.save(m, tmp_path / "ck", meta)
    assert str(e.value) == (
        'checkpoint metadata: metrics.top1 must be an object such as {"loss": 0.31, "top1": 0.91, '
        '"top5": 0.99, "n": 360}, not float 0.9; give it the shape tensorcut writes, or keep your '
        "own value under another key"
    )
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())
    meta["my_metrics"] = meta.pop("metrics")  # under a key of its own it is kept as it is
    tio.save(m, tmp_path / "ck", meta)
    ck = tio.load_checkpoint(tmp_path / "ck")
    assert ck.meta["my_metrics"] == {"top1": 0.9} and ck.info.extra == {"my_metrics": {"top1": 0.9}}


def test_save_needs_a_model_name(tmp_path):
    m = models.create("resnet20", width=0.25)
    for meta in ({"model": {"kwargs": {}}}, {"model": "resnet20"}, {"model": {"name": ""}}):
        with pytest.raises(TensorcutError, match="^checkpoint metadata needs model.name"):
            tio.save(m, tmp_path / "ck", meta)


def test_info_is_the_typed_meta(tmp_path):
    _, d = _save_tiny(tmp_path)
    ck = tio.load_checkpoint(d)
    assert ck.info.model.name == "resnet20" and ck.info.model.kwargs == {"width": 0.25}
    assert ck.info.to_meta() == ck.meta == tio.read_meta(d)
    assert tio.read_info(d) == ck.info
