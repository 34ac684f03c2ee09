"""Per-layer accuracy costs measured at several ranks (``compression/measured.py``): drop 0 at
full rank, the table's shape and JSON round trip, the model left as it was, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tensorcut.compression import CompressConfig, plan
from tensorcut.compression.measured import DropTable, measure_layer_drops
from tensorcut.compression.selection import select_layers
from tensorcut.errors import TensorcutError

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = CompressConfig(method="tucker2", budget=0.5, budget_kind="macs", allocation="measured")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    ).eval()


def _loader(n: int = 48) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, 6, 6, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _full_rungs(net: nn.Module) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    sel = select_layers(net, CFG, input_shape=(4, 6, 6))
    return {
        n: [("tucker2", tuple(b.cls("tucker2").max_ranks(b.geom)))] for n, b in sel.builders.items()
    }


def test_full_rank_costs_nothing():
    net = _net()
    loader = _loader()
    t = measure_layer_drops(net, loader, CFG, rungs=_full_rungs(net), progress=False)
    assert [ld.name for ld in t.layers] == ["0", "3", "6"]
    # tolerance: full-rank Tucker-2 reproduces each kernel to float32 rounding, so every logit
    # moves by at most ~1e-5 of its size (BatchNorm re-estimated on equal activations up to the
    # same rounding); cross-entropy is 2-Lipschitz in the largest logit change, hence
    # |loss increase| <= 2 * 1e-5 * max|logit|, taken with a x10 margin
    with torch.no_grad():
        zmax = max(float(net(x).abs().max()) for x, _ in loader)
    tol = 2 * 1e-4 * max(zmax, 1.0)
    for ld in t.layers:
        (o,) = ld.options
        assert o.error < 1e-5
        assert abs(o.loss_increase) <= tol
        assert abs(o.top1_drop) <= 1 / t.images  # at most one image on a near tie
    assert t.images == 48 and t.bn_recalibrated


def test_ladder_options_are_smaller_and_recorded():
    net = _net()
    before = copy.deepcopy(net.state_dict())
    t = measure_layer_drops(net, _loader(), CFG, fractions=(0.6, 0.3), progress=False)
    for ld in t.layers:
        assert 1 <= len(ld.options) <= 2
        for o in ld.options:
            assert o.method == "tucker2" and o.params < ld.dense_params
            assert o.macs < ld.dense_macs
            assert o.loss_increase == pytest.approx(o.loss - t.baseline_loss)
            assert o.top1_drop == pytest.approx(t.baseline_top1 - o.top1)
        sizes = [o.params for o in ld.options]
        assert sizes == sorted(sizes, reverse=True)
    # the model is not changed: same modules, same weights and BatchNorm statistics
    assert all(not hasattr(m, "ranks") for m in net.modules())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "loss +" in t.table()


def test_json_round_trip(tmp_path):
    net = _net()
    t = measure_layer_drops(net, _loader(), CFG, fractions=(0.4,), progress=False)
    t.save(tmp_path / "drops.json")
    assert DropTable.load(tmp_path / "drops.json") == t
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(TensorcutError, match="not a tensorcut drop table"):
        DropTable.load(tmp_path / "bad.json")


@pytest.mark.filterwarnings("ignore:.*keep almost nothing")  # a random net's flat spectra
def test_plan_consumes_the_table():
    net = _net()
    t = measure_layer_drops(net, _loader(), CFG, fractions=(0.6, 0.3, 0.15), progress=False)
    p = plan(net, CFG, drops=t, input_shape=(4, 6, 6), progress=False)
    tot = p.totals()
    assert tot["conv_macs_after"] <= 0.5 * tot["conv_macs_before"]
    for e in p.layers:
        assert e.measured is not None and e.measured["objective"] == "loss"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"objective": "accuracy"}, "objective must be one of"),
        ({"fractions": (0.5, 1.5)}, "fractions are parameter fractions"),
        ({"fractions": ()}, "fractions are parameter fractions"),
        ({"methods": ["nope"]}, "nope"),
        ({"max_batches": 0}, "max_batches must be >= 1"),
        ({"rungs": {"9": [("tucker2", (2, 2))]}}, "rungs name layer '9'"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(TensorcutError, match=match) as e:
        measure_layer_drops(_net(), _loader(), CFG, progress=False, **kwargs)
    assert "\n" not in str(e.value)


def test_loaders_without_labels_or_images_are_refused():
    x = torch.randn(8, 4, 6, 6)
    with pytest.raises(TensorcutError, match="need labels"):
        measure_layer_drops(_net(), DataLoader(x, batch_size=4), CFG, progress=False)
    with pytest.raises(TensorcutError, match="loader is empty"):
        measure_layer_drops(_net(), [], CFG, progress=False)


def test_plan_refuses_a_measured_allocation_without_its_table_and_vice_versa():
    net = _net()
    with pytest.raises(TensorcutError, match="needs the measured drops: pass drops="):
        plan(net, CFG, input_shape=(4, 6, 6), progress=False)
    t = measure_layer_drops(net, _loader(), CFG, fractions=(0.4,), progress=False)
    with pytest.raises(TensorcutError, match="add allocation='measured'"):
        plan(net, CompressConfig(budget=0.5), drops=t, input_shape=(4, 6, 6), progress=False)
    with pytest.raises(TensorcutError, match="drop sensitivity"):
        plan(net, CFG, drops=t, sensitivity={"3": 2.0}, input_shape=(4, 6, 6), progress=False)
    with pytest.raises(TensorcutError, match="must be a DropTable"):
        plan(net, CFG, drops={"a": 1}, input_shape=(4, 6, 6), progress=False)  # type: ignore[arg-type]
    with pytest.raises(TensorcutError, match="another layer or input size"):
        plan(net, CFG, drops=t, input_shape=(4, 8, 8), progress=False)
