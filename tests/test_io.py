"""Checkpoints: save/load round trip, atomic writes, and every kind of bad checkpoint."""

import json
import pickle

import pytest
import torch

from tensorcut import io as tio
from tensorcut import models
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
    with pytest.raises(TensorcutError, match="unknown model 'resnet9000'"):
        tio.load(d)


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        tio.atomic_write_text(tmp_path / "m.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "m.txt").stat().st_mode & 0o777 == 0o644
