"""CompressConfig (``compression/config.py``): the one rank grammar validated once, the typed
method options, the default layer filter, and the JSON form."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from torch import nn

from tensorcut.compression.config import DEFAULT_METHOD, CompressConfig, default_filter
from tensorcut.errors import TensorcutError
from tensorcut.layers import CPOptions, TuckerOptions, get_method, list_methods

#: the registered methods and 'auto', as the refusals list them (a new method is one file)
CHOICES = ", ".join(sorted([*list_methods(), "auto"]))
#: the methods rank='vbmf' applies to
VBMF = [m for m in list_methods() if get_method(m).supports_vbmf]


@pytest.mark.parametrize(
    "kw,kind",
    [
        ({"rank": 4}, "rank"),
        ({"rank": [4, 3]}, "rank"),
        ({"rank": "full"}, "full"),
        ({"rank": "vbmf"}, "vbmf"),
        ({"ratio": 0.3}, "ratio"),
        ({"eps": 0.1}, "eps"),
        ({"energy": 0.9}, "energy"),
        ({"budget": 0.5}, "none"),
    ],
)
def test_each_rank_rule_is_one_kind(kw: dict[str, Any], kind: str) -> None:
    cfg = CompressConfig(**kw)
    assert cfg.method == DEFAULT_METHOD == "tucker2" and cfg.rule.kind == kind
    if "rank" in kw and isinstance(kw["rank"], list):
        assert cfg.rank == (4, 3)  # a list (from JSON) is read as a tuple


@pytest.mark.parametrize(
    "kw,msg",
    [
        (
            {"method": "svd3", "ratio": 0.5},
            f"unknown method 'svd3'; choose one of: {CHOICES}",
        ),
        ({}, "no rank rule: give one of rank, ratio, eps, energy, rank='vbmf', or a budget"),
        (
            {"ratio": 0.5, "budget": 0.5},
            "contradictory rank options: budget and ratio; give one of them",
        ),
        ({"budget": 0}, "budget must be > 0, got 0"),
        (
            {"budget": 0.5, "budget_kind": "latency"},
            "budget kind must be 'params' or 'macs', got 'latency'",
        ),
        ({"ratio": 0.5, "align": 0}, "align must be a positive integer (e.g. 8 or 16), got 0"),
        (
            {"ratio": 0.5, "align": True},
            "align must be a positive integer (e.g. 8 or 16), got True",
        ),
        ({"ratio": 0.5, "align": 8.0}, "align must be a positive integer (e.g. 8 or 16), got 8.0"),
        (
            {"ratio": 0.5, "allow_custom_forward": 1},
            "allow_custom_forward must be True or False, got 1",
        ),
        (
            {"method": "cp", "rank": "vbmf"},
            f"rank='vbmf' applies to {', '.join(VBMF)} only; use method={VBMF[0]!r} (got 'cp')",
        ),
        (
            {"method": "auto", "rank": "vbmf"},
            f"rank='vbmf' applies to {', '.join(VBMF)} only; use method={VBMF[0]!r} (got 'auto')",
        ),
        (
            {"ratio": 1.5},
            "ratio is the fraction of parameters to keep and must be in (0, 1), got 1.5",
        ),
    ],
)
def test_refusals_are_one_exact_line(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(TensorcutError) as e:
        CompressConfig(**kw)
    assert str(e.value) == msg


def test_options_for_a_method_that_is_not_used_are_refused() -> None:
    with pytest.raises(TensorcutError) as e:
        CompressConfig(method="tucker2", ratio=0.5, options={"cp": {"n_iter_max": 5}})
    assert str(e.value) == (
        "options for cp given but method is 'tucker2'; drop them or use method='cp'"
    )
    # 'auto' may use any method, so it takes options for all of them
    cfg = CompressConfig(method="auto", ratio=0.5, options={"cp": {"n_iter_max": 5}})
    assert cfg.method_options("cp") == CPOptions(n_iter_max=5)


def test_options_are_typed_and_checked() -> None:
    cfg = CompressConfig(method="cp", ratio=0.5, options={"cp": CPOptions(seed=2)})
    assert cfg.method_options("cp").kwargs() == {"seed": 2}
    assert CompressConfig(ratio=0.5).method_options("tucker2") == TuckerOptions()
    with pytest.raises(TensorcutError) as e:
        CompressConfig(method="cp", ratio=0.5, options={"cp": {"iters": 5}})
    assert str(e.value).startswith("unknown options for cp: ['iters']; valid: n_iter_max, tol,")
    with pytest.raises(TensorcutError) as e:
        CompressConfig(ratio=0.5, options=[("tucker2", {})])  # type: ignore[arg-type]
    assert str(e.value) == "options must be a dict {method: {option: value}}, got list"
    with pytest.raises(TensorcutError, match=r"^unknown method 'nope'; choose one of: "):
        CompressConfig(ratio=0.5, options={"nope": {}})


@pytest.mark.parametrize(
    "kw",
    [
        {"method": "cp", "rank": 5, "options": {"cp": {"n_iter_max": 50, "seed": 1}}},
        {"rank": (4, 3), "align": 8},
        {"method": "auto", "budget": 0.4, "budget_kind": "macs", "latency": True},
        {"method": "tt", "eps": 0.2, "fallback": False, "allow_custom_forward": True},
    ],
)
def test_json_round_trip(kw: dict[str, Any]) -> None:
    cfg = CompressConfig(**kw)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert CompressConfig(**d) == cfg
    assert set(d) == {f.name for f in dataclasses.fields(CompressConfig)}  # every field


def test_every_registered_method_is_a_valid_config() -> None:
    for m in list_methods():
        assert CompressConfig(method=m, rank="full").method == m


def test_default_filter_skips_stems_and_non_convs() -> None:
    assert not default_filter("stem", nn.Conv2d(3, 8, 3))
    assert default_filter("body", nn.Conv2d(4, 8, 3))
    assert default_filter("dw", nn.Conv2d(8, 8, 3, groups=8))  # listed; the plan says why dense
    assert not default_filter("fc", nn.Linear(8, 8))


def test_allocation_is_checked_in_one_line():
    assert CompressConfig(budget=0.5).allocation == "ladder"
    cfg = CompressConfig(budget=0.5, budget_kind="macs", allocation="measured")
    assert cfg.to_dict()["allocation"] == "measured"
    for kw, match in (
        ({"budget": 0.5, "allocation": "knapsack"}, "allocation must be one of 'ladder', "),
        ({"ratio": 0.5, "allocation": "measured"}, "allocation='measured' splits a budget"),
    ):
        with pytest.raises(TensorcutError, match=match) as e:
            CompressConfig(**kw)
        assert "\n" not in str(e.value)
