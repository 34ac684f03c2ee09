"""The plan (``compression/plan.py``): totals, the table, the JSON round trip and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tensorcut.compression import plan
from tensorcut.compression.plan import LayerPlan, Plan
from tensorcut.errors import TensorcutError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: listed, left dense
    )


@pytest.fixture(scope="module")
def made() -> Plan:
    return plan(_net(), ratio=0.4, input_shape=(4, 8, 8), progress=False)


def test_totals_add_up_over_the_layers(made: Plan) -> None:
    t = made.totals()
    fact = [lp for lp in made.layers if lp.status == "factorize"]
    dense = [lp for lp in made.layers if lp.status != "factorize"]
    assert (t["factorized_layers"], t["dense_layers"]) == (len(fact), len(dense)) == (2, 1)
    assert t["conv_params_before"] == sum(lp.params_before for lp in made.layers)
    assert t["conv_params_after"] == sum(lp.params_after for lp in fact) + sum(
        lp.params_before for lp in dense
    )
    assert t["model_params_before"] == sum(p.numel() for p in _net().parameters())
    assert t["conv_ratio"] == pytest.approx(t["conv_params_before"] / t["conv_params_after"])
    assert fact[0].ratio == pytest.approx(fact[0].params_before / fact[0].params_after)
    assert dense[0].params_after == 0 and dense[0].ratio == 1.0 == dense[0].mac_ratio


def test_json_round_trip_is_exact(made: Plan, tmp_path: Path) -> None:
    again = Plan.from_dict(json.loads(made.to_json()))
    assert again == made  # dataclass equality: config, every LayerPlan, shapes, counts
    made.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == made and loaded.to_dict() == made.to_dict()
    assert loaded.to_dict()["format"] == "tensorcut-plan" and loaded.to_dict()["version"] == 1


def test_table_lists_every_layer_and_both_totals(made: Plan) -> None:
    lines = made.table().splitlines()
    assert lines[0].split() == [
        "layer", "method", "ranks", "params", "->", "PCR", "MACs", "->", "FCR", "rel.err",
        "out.err", "decision",
    ]  # fmt: skip
    assert set(lines[1]) <= {"-", " "}
    body = lines[2:-1]
    assert [r.split()[0] for r in body[:3]] == ["0", "2", "4"]
    assert body[3].startswith("conv layers") and body[4].startswith("whole model")
    assert "dense: " in body[2] and body[0].split()[1] == "tucker2"
    assert lines[-1].endswith("MACs per image at input 4x8x8.")


@pytest.mark.parametrize(
    "d,msg",
    [
        ({"layers": []}, "not a tensorcut plan (missing format='tensorcut-plan')"),
        ([], "not a tensorcut plan (missing format='tensorcut-plan')"),
        ({"format": "tensorcut-plan", "config": {}}, "malformed plan: 'layers'"),
    ],
)
def test_from_dict_refuses_what_is_not_a_plan(d: object, msg: str) -> None:
    with pytest.raises(TensorcutError) as e:
        Plan.from_dict(d)  # type: ignore[arg-type]
    assert str(e.value) == msg


def test_from_dict_refuses_a_layer_with_unknown_fields(made: Plan) -> None:
    d = made.to_dict()
    d["layers"][0]["bogus"] = 1
    with pytest.raises(TensorcutError, match=r"^malformed plan: .*bogus"):
        Plan.from_dict(d)


def test_load_refuses_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TensorcutError, match=r"^cannot read plan .*: FileNotFoundError: "):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TensorcutError, match=r"^cannot read plan .*: JSONDecodeError: "):
        Plan.load(tmp_path / "bad.json")


def test_layer_ratios_of_a_dense_entry_are_one() -> None:
    lp = LayerPlan("c", "-", "dense", "why", [], 100, 0, 1000, 0, None, {}, [])
    assert lp.ratio == 1.0 and lp.mac_ratio == 1.0
