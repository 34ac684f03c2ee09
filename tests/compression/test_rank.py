"""Rank rules: grammar validation, clamping, ratio search, VBMF, budget allocation."""

import pytest
import torch

from tensorcut.compression.rank import (
    Candidate,
    LayerLadder,
    RankRule,
    align_ranks,
    allocate_budget,
    clamp_ranks,
    evbmf_rank,
    ranks_for_ratio,
)
from tensorcut.errors import TensorcutError


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"rank": 4, "ratio": 0.5}, "contradictory rank options: rank, ratio"),
        ({"rank": 0}, "rank must be >= 1, got 0"),
        ({"rank": -3}, "rank must be >= 1, got -3"),
        ({"rank": (4, 0)}, "ranks must be positive ints"),
        ({"rank": "auto"}, "unknown rank rule 'auto'"),
        ({"ratio": 1.5}, r"ratio is the fraction of parameters to keep and must be in \(0, 1\)"),
        ({"eps": 0.0}, "eps is a relative error bound"),
        ({"energy": 1.2}, "energy is the fraction of squared norm kept"),
    ],
)
def test_rule_validation(kw, msg):
    with pytest.raises(TensorcutError, match=msg):
        RankRule(**kw)


def test_clamp_reports_what_changed():
    r, note = clamp_ranks((100, 3), (16, 8))
    assert (
        r == (16, 3) and note == "ranks (100, 3) clamped to (16, 3) (kernel admits at most (16, 8))"
    )
    assert clamp_ranks((2, 3), (16, 8)) == ((2, 3), "")


def test_ratio_search_meets_target_and_is_maximal():
    params = lambda r: r[0] * 64 + r[0] * r[1] * 9 + r[1] * 32  # noqa: E731  (Tucker-2 like)
    mx = (64, 32)
    for target in (500, 5000, 15000):
        r = ranks_for_ratio(mx, params, target)
        assert params(r) <= target
        bigger = (min(64, r[0] + 2), min(32, r[1] + 1))
        assert params(bigger) > target or bigger == r


def test_evbmf_finds_planted_rank_and_never_zero():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(60, 6, generator=g) @ torch.randn(6, 150, generator=g) + 0.05 * torch.randn(
        60, 150, generator=g
    )
    assert evbmf_rank(low) == 6
    assert evbmf_rank(torch.randn(40, 90, generator=g)) >= 1
    assert evbmf_rank(torch.zeros(5, 7)) == 1


def _ladder(name, dense, errs, weight=1.0):
    cands = [Candidate((i,), p, p, e) for i, (p, e) in enumerate(errs)]
    return LayerLadder(name, dense, dense, cands, weight=weight)


def test_budget_allocation_meets_budget_and_prefers_cheap_error():
    a = _ladder("a", 1000, [(500, 0.01), (200, 0.02), (100, 0.03)])  # compresses cheaply
    b = _ladder("b", 1000, [(500, 0.3), (200, 0.6), (100, 0.9)])  # costly in error
    assert allocate_budget([a, b], 1100)
    assert a.cost("params") + b.cost("params") <= 1100
    assert a.choice > b.choice


def test_sensitive_layer_is_compressed_more_mildly():
    def run(wa, wb):
        a = _ladder("a", 1000, [(500, 0.1), (200, 0.2), (100, 0.3)], wa)
        b = _ladder("b", 1000, [(500, 0.1), (200, 0.2), (100, 0.3)], wb)
        allocate_budget([a, b], 700)
        return a.cost("params"), b.cost("params")

    pa, pb = run(100.0, 1.0)
    assert pa > pb
    pa, pb = run(1.0, 100.0)
    assert pa < pb


def test_budget_that_cannot_be_met_reports_false():
    a = _ladder("a", 1000, [(500, 0.1)])
    assert not allocate_budget([a], 10)
    assert a.choice == 0


def test_align_ranks_down_up_and_bounds():
    assert align_ranks((25, 31, 7), (64, 64, 64), 8) == (24, 24, 8)  # down, never below align
    assert align_ranks((25, 31, 7), (64, 64, 64), 8, up=True) == (32, 32, 8)
    assert align_ranks((25, 60), (30, 60), 16, up=True) == (30, 60)  # the mode maximum caps
    assert align_ranks((3,), (5,), 8) == (5,)  # maximum below align: the maximum
    assert align_ranks((17, 33), (64, 64), 1) == (17, 33)
    with pytest.raises(TensorcutError, match="align must be a positive integer, got 0"):
        align_ranks((4,), (8,), 0)


def test_ratio_search_with_align_fills_the_budget():
    from tensorcut.geometry import ConvGeometry
    from tensorcut.layers import TuckerConv2d

    g = ConvGeometry(64, 64, (3, 3), padding=(1, 1), bias=False)
    cost = lambda r: TuckerConv2d.predicted_macs(g, r, (32, 32))  # noqa: E731
    target = 0.25 * g.dense_macs((32, 32))
    assert ranks_for_ratio(TuckerConv2d.max_ranks(g), cost, target) == (25, 25)
    r = ranks_for_ratio(TuckerConv2d.max_ranks(g), cost, target, align=16)
    assert all(x % 16 == 0 for x in r) and cost(r) <= target
    # maximal: no single mode can grow by 16 within the target
    assert all(cost(r[:k] + (r[k] + 16,) + r[k + 1 :]) > target for k in range(2))
    assert cost(r) > cost((16, 16))
