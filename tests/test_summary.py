"""The per-layer inventory (``summary.py``): rows, counts from the one cost model, the table."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tensorcut.compression import apply, plan
from tensorcut.layers import TuckerConv2d
from tensorcut.summary import ModelSummary, probe, summarize

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )


def test_dense_rows_count_parameters_and_macs() -> None:
    s = summarize(_net(), (3, 8, 8))
    assert [(r.name, r.kind, r.shape) for r in s.rows] == [
        ("0", "Conv2d", "8x3x3x3"),
        ("2", "Conv2d", "8x8x3x3"),
        ("4", "Linear", "5x128"),
    ]
    assert [r.params for r in s.rows] == [8 * 27 + 8, 8 * 72 + 8, 128 * 5 + 5]
    assert [r.macs for r in s.rows] == [8 * 27 * 64, 8 * 72 * 16, 128 * 5]
    assert s.total_params == sum(p.numel() for p in _net().parameters())
    assert s.total_macs == sum(r.macs for r in s.rows) and s.input_shape == (3, 8, 8)
    assert all(r.ratio == 1.0 and r.ranks == "" for r in s.rows)


def test_a_factorized_layer_is_one_row_with_its_ranks_and_ratio() -> None:
    model = _net()
    apply(model, plan(model, rank=(4, 3), layers=["2"], input_shape=(3, 8, 8), progress=False))
    assert isinstance(model[2], TuckerConv2d)
    s = summarize(model, (3, 8, 8))
    row = next(r for r in s.rows if r.name == "2")
    assert [r.name for r in s.rows] == ["0", "2", "4"]  # inner convs are not listed
    assert (row.kind, row.shape, row.ranks) == ("TuckerConv2d", "8x8x3x3", "4x3")
    assert row.params == model[2].num_params() and row.dense_params == 8 * 72 + 8
    assert row.macs == model[2].macs((8, 8))
    assert row.ratio == pytest.approx((8 * 72 + 8) / model[2].num_params())
    assert s.total_params == sum(p.numel() for p in model.parameters())


def test_table_and_json() -> None:
    s = summarize(_net(), (3, 8, 8))
    lines = s.table().splitlines()
    assert lines[0].split() == ["layer", "type", "weight", "shape", "ranks", "params", "MACs", "CR"]
    assert lines[-3].startswith("total (listed layers)") and lines[-2].startswith(
        "total (whole model)"
    )
    assert lines[-1] == (
        "MACs are multiply-accumulates per image at input 3x8x8; CR = dense / stored parameters."
    )
    d = json.loads(json.dumps(s.to_dict()))
    assert d["total_params"] == s.total_params and len(d["rows"]) == 3
    assert d["rows"][2] == {
        "name": "4", "kind": "Linear", "shape": "5x128", "params": 645, "macs": 640, "ranks": "",
        "dense_params": 645,
    }  # fmt: skip
    assert isinstance(s, ModelSummary)


def test_probe_restores_training_and_removes_hooks() -> None:
    model = _net().train()
    seen: list[tuple[int, ...]] = []
    h = model[2].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    probe(model, (3, 8, 8), [h])
    assert seen == [(1, 8, 4, 4)] and model.training
    model(torch.zeros(1, 3, 8, 8))
    assert len(seen) == 1  # the hook is gone
