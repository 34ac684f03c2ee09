"""Budget allocation (issue 16): a MAC budget keeps about the same parameter fraction in every
layer (the ``fraction`` rule), a parameter budget evens the weighted relative error out (the
``minmax`` rule); neither crushes layers that hold few parameters but many MACs, as the greedy
rule with parameter-count weights did."""

import json

import pytest
import torch

import tensorcut.layers  # noqa: F401  (registers the layer classes)
from tensorcut import models
from tensorcut.compression import CompressConfig, budget, plan
from tensorcut.compression.budget import BUDGET_SCALES
from tensorcut.compression.rank import Candidate, LayerLadder, allocate_budget, scaled_ranks
from tensorcut.errors import TensorcutError
from tensorcut.summary import summarize

SHAPE = (1, 28, 28)


def _resnet():
    """Full-width resnet20: 16-, 32- and 64-channel convs with about the same MACs each."""
    torch.manual_seed(0)
    return models.create("resnet20", num_classes=10, in_channels=1, width=1.0, input_size=28).eval()


def _ladder(name, dense, rows, weight=1.0):
    """A ladder whose candidate i costs rows[i][0] params and MACs at error rows[i][1]."""
    cands = [Candidate((i + 1,), c, c, e) for i, (c, e) in enumerate(rows)]
    return LayerLadder(name, dense, dense, cands, weight=weight)


def _even(ladders, k):
    """The same ladder position ``k`` for every layer: (total cost, max error)."""
    cost = sum(lad.candidates[k].params for lad in ladders)
    return cost, max(lad.candidates[k].error for lad in ladders)


# ----------------------------------------------------------------------------- allocate_budget


def _cheap_and_costly():
    # "small" saves little per step at a large error (like a 16-channel conv under a parameter
    # count), "big" saves a lot at a small error
    small = _ladder("small", 400, [(300, 0.2), (200, 0.5), (100, 0.9)])
    big = _ladder("big", 4000, [(3000, 0.1), (2000, 0.3), (1000, 0.6)])
    return [small, big]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_minmax_never_exceeds_the_even_allocation_error(k):
    lads = _cheap_and_costly()
    cost, worst = _even(lads, k)
    assert allocate_budget(lads, cost, "params")
    assert sum(lad.cost("params") for lad in lads) <= cost
    assert max(lad.error() for lad in lads) <= worst


def test_greedy_rule_is_kept_and_differs():
    def lads():
        return [
            _ladder("a", 1000, [(500, 0.5), (100, 0.9)]),
            _ladder("b", 1000, [(900, 0.05), (800, 0.1), (700, 0.2)]),
        ]

    g = lads()
    assert allocate_budget(g, 1400, "params", rule="greedy")
    assert [lad.choice for lad in g] == [0, 2]  # b squeezed first, its error is cheap per unit
    m = lads()
    assert allocate_budget(m, 1400, "params")
    # a's step sets the level (0.5) either way; the slack buys b back to its mildest candidate
    assert [lad.choice for lad in m] == [0, 0]


def test_slack_is_spent_until_no_step_up_fits():
    lads = _cheap_and_costly()
    target = 2350
    assert allocate_budget(lads, target, "params")
    spare = target - sum(lad.cost("params") for lad in lads)
    assert spare >= 0
    for lad in lads:
        for i in [-1, *range(len(lad.candidates))]:
            err = 0.0 if i < 0 else lad.candidates[i].error
            if err < lad.error():
                assert lad.cost_at(i, "params") - lad.cost("params") > spare


def test_weight_is_a_multiplier_on_the_squared_error():
    def run(wa, wb):
        a = _ladder("a", 1000, [(500, 0.1), (200, 0.2), (100, 0.3)], wa)
        b = _ladder("b", 1000, [(500, 0.1), (200, 0.2), (100, 0.3)], wb)
        assert allocate_budget([a, b], 700, "params")
        return a.error(), b.error()

    ea, eb = run(10.0, 1.0)
    assert ea < eb
    ea, eb = run(1.0, 10.0)
    assert ea > eb


def test_dense_when_the_budget_allows_it():
    lads = _cheap_and_costly()
    assert allocate_budget(lads, 4400, "params")
    assert [lad.choice for lad in lads] == [-1, -1]
    lads = _cheap_and_costly()
    # both dense do not fit; the least error that does: big at its first step, small dense
    assert allocate_budget(lads, 4300, "params")
    assert [lad.choice for lad in lads] == [-1, 0]


def test_unreachable_budget_returns_false_with_the_smallest_candidates():
    lads = _cheap_and_costly()
    assert not allocate_budget(lads, 500, "params")
    assert [lad.choice for lad in lads] == [2, 2]


def test_failed_candidates_are_never_chosen():
    lad = _ladder("a", 1000, [(500, 0.1), (200, float("inf"))])
    other = _ladder("b", 1000, [(500, 0.1), (200, 0.2)])
    assert allocate_budget([lad, other], 700, "params")
    assert lad.choice == 0 and other.choice == 1


def test_unknown_rule_is_refused():
    with pytest.raises(
        TensorcutError, match=r"^allocation rule must be 'minmax', 'fraction' or 'greedy', got 'x'$"
    ):
        allocate_budget(_cheap_and_costly(), 1000, "params", rule="x")


def _same_shape(name, weight=1.0):
    # parameters kept: 90 %, 70 %, 50 %, 30 %, 10 % (levels = fraction removed)
    return _ladder(name, 1000, [(900, 0.1), (700, 0.2), (500, 0.3), (300, 0.5), (100, 0.8)], weight)


def test_fraction_rule_keeps_the_same_fraction_everywhere():
    lads = [_same_shape("a"), _same_shape("b"), _same_shape("c")]
    assert allocate_budget(lads, 1500, "params", rule="fraction")
    assert [lad.choice for lad in lads] == [2, 2, 2]


def test_fraction_rule_spends_the_slack_on_the_most_squeezed_layer():
    lads = [_same_shape("a"), _same_shape("b")]
    assert allocate_budget(lads, 1200, "params", rule="fraction")
    assert sorted(lad.cost("params") for lad in lads) == [500, 700]


def test_fraction_rule_weight_divides_the_removed_fraction():
    # weight 4: a's removed fraction counts double, so a removes 30 % where b and c remove 70 %
    lads = [_same_shape("a", weight=4.0), _same_shape("b"), _same_shape("c")]
    assert allocate_budget(lads, 1300, "params", rule="fraction")
    assert [lad.cost("params") for lad in lads] == [700, 300, 300]


def test_fraction_rule_reports_an_unreachable_budget():
    lads = [_same_shape("a"), _same_shape("b")]
    assert not allocate_budget(lads, 150, "params", rule="fraction")
    assert [lad.choice for lad in lads] == [4, 4]


# ----------------------------------------------------------------------------- through plan()


@pytest.fixture
def captured(monkeypatch):
    """The ladders the planner hands to the allocator (errors filled in by the allocation)."""
    seen = []
    real = budget.allocate_budget

    def spy(ladders, *args, **kwargs):
        seen.append(ladders)
        return real(ladders, *args, **kwargs)

    monkeypatch.setattr(budget, "allocate_budget", spy)
    return seen


def _macs_plan(model, x, **kw):
    return plan(
        model,
        CompressConfig(method="tucker2", budget=int(x), budget_kind="macs"),
        input_shape=SHAPE,
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_mac_budget_is_met(fraction):
    m = _resnet()
    total = summarize(m, SHAPE).total_macs
    p = _macs_plan(m, fraction * total)
    assert p.totals()["model_macs_after"] <= fraction * total


def test_ladder_weight_is_the_sensitivity_not_the_layer_size(captured):
    m = _resnet()
    total = summarize(m, SHAPE).total_macs
    _macs_plan(m, total / 3, sensitivity={"layer3.0.conv2": 10.0})
    (lads,) = captured
    weights = {lad.name: lad.weight for lad in lads}
    assert weights.pop("layer3.0.conv2") == 10.0
    assert set(weights.values()) == {1.0}


def test_param_budget_error_is_at_most_the_even_ladder_error(captured):
    """On the real ladders of a 16/32/64-channel network: at the cost of every layer taking the
    same ladder scale, no layer ends with a larger relative error than that even choice's worst."""
    m = _resnet()
    plan(
        m,
        CompressConfig(method="tucker2", budget=1 / 3, budget_kind="params"),
        input_shape=SHAPE,
        progress=False,
    )
    (lads,) = captured
    convs = dict(m.named_modules())
    checked = 0
    for s in BUDGET_SCALES[1:]:
        picks = []
        for lad in lads:
            conv = convs[lad.name]
            r = scaled_ranks((conv.out_channels, conv.in_channels), s)
            idx = [i for i, c in enumerate(lad.candidates) if c.ranks == r]
            picks.append(idx[0] if idx else -1)
        if -1 in picks:
            continue
        cost = sum(lad.cost_at(i, "params") for lad, i in zip(lads, picks, strict=True))
        worst = max(lad.error_at(i) for lad, i in zip(lads, picks, strict=True))
        for lad in lads:
            lad.choice = -1
        assert allocate_budget(lads, cost, "params")
        assert sum(lad.cost("params") for lad in lads) <= cost
        assert max(lad.error() for lad in lads) <= worst + 1e-12
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("ratio", [0.5, 0.33, 0.25])
def test_mac_budget_at_the_uniform_macs_is_no_worse_than_uniform_ranks(ratio):
    """The failure this fixes: a MAC budget squeezed 16-channel convs to rank 1. At the MACs of
    uniform ranks the budget keeps every layer at least as large, so no error is larger."""
    m = _resnet()
    uni = plan(m, CompressConfig(method="tucker2", ratio=ratio), input_shape=SHAPE, progress=False)
    macs = uni.totals()["model_macs_after"]
    got = _macs_plan(m, macs)
    assert got.totals()["model_macs_after"] <= macs
    u = {l.name: l for l in uni.layers}
    for l in got.layers:
        assert l.status == u[l.name].status
        if l.status == "factorize":
            assert l.params_after >= u[l.name].params_after
            assert l.error <= u[l.name].error + 1e-9


def test_sensitivity_gives_a_layer_a_smaller_error():
    m = _resnet()
    total = summarize(m, SHAPE).total_macs
    name = "layer1.1.conv1"
    err = {}
    for sens in (None, {name: 10.0}):
        p = _macs_plan(m, total / 3, sensitivity=sens)
        lp = {l.name: l for l in p.layers}[name]
        err[sens is None] = lp.error if lp.status == "factorize" else 0.0
    assert err[False] < err[True]


def test_allocation_is_deterministic():
    m = _resnet()
    total = summarize(m, SHAPE).total_macs
    a = _macs_plan(m, total / 3)
    b = _macs_plan(m, total / 3)
    assert [(l.name, l.status, l.ranks) for l in a.layers] == [
        (l.name, l.status, l.ranks) for l in b.layers
    ]


# ----------------------------------------------------------------------------- measured allocation


def _measured_cfg(budget):
    return CompressConfig(
        method="tucker2", budget=budget, budget_kind="macs", allocation="measured"
    )


def _handmade(model, value_of, fractions=(0.6, 0.3, 0.1)):
    """A DropTable for ``model``'s listed layers with made-up values: ``value_of(name, fraction)``
    is the loss increase of keeping ``fraction`` of the layer's parameters."""
    from tensorcut.compression.measured import DropTable, LayerDrops, MeasuredOption, ladder_ranks
    from tensorcut.compression.selection import select_layers

    sel = select_layers(model, _measured_cfg(0.5), input_shape=SHAPE)
    layers = []
    for n, b in sel.builders.items():
        opts = []
        for f in fractions:
            rs = ladder_ranks(b, "tucker2", (f,))
            if not rs or any(o.ranks == list(rs[0]) for o in opts):
                continue
            r = rs[0]
            v = value_of(n, f)
            opts.append(
                MeasuredOption(
                    "tucker2",
                    list(r),
                    b.params("tucker2", r),
                    b.macs("tucker2", r),
                    0.5,
                    0.9 - v,
                    0.3 + v,
                    v,
                    v,
                )
            )
        layers.append(LayerDrops(n, b.geom.dense_params(), b.dense_macs(), opts))
    return DropTable(layers, 0.9, 0.3, 100, list(SHAPE), ["tucker2"])


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
    ).eval()


@pytest.mark.filterwarnings("ignore:.*keep almost nothing")  # random kernels, flat spectra
def test_measured_allocation_is_the_brute_force_optimum_within_the_budget():
    import itertools

    net = _net()
    vals = {"1": 0.02, "3": 0.2, "5": 0.05}
    table = _handmade(net, lambda n, f: vals[n] * (1 - f) ** 2)
    dense = {ld.name: ld.dense_macs for ld in table.layers}
    listed = sum(dense.values())
    for frac in (0.3, 0.5, 0.7, 0.9):
        p = plan(net, _measured_cfg(frac), drops=table, input_shape=SHAPE, progress=False)
        tot = p.totals()
        assert tot["conv_macs_after"] - (tot["conv_macs_before"] - listed) <= frac * listed
        got = sum(e.measured["value"] for e in p.layers if e.measured)
        best = min(
            sum(v for _, v in ch)
            for ch in itertools.product(
                *[
                    [(ld.dense_macs, 0.0)] + [(o.macs, o.loss_increase) for o in ld.options]
                    for ld in table.layers
                ]
            )
            if sum(c for c, _ in ch) <= frac * listed
        )
        assert got == pytest.approx(best)


def test_measured_allocation_keeps_dense_what_costs_most_per_mac_and_says_why():
    net = _net()
    # layer 3 loses a lot at any rank, the others little: a mild budget compresses them, not 3
    table = _handmade(net, lambda n, f: 1.0 if n == "3" else 0.01 * (1 - f))
    p = plan(net, _measured_cfg(0.75), drops=table, input_shape=SHAPE, progress=False)
    by = {e.name: e for e in p.layers}
    assert by["3"].status == "dense"
    assert by["3"].reason.startswith("kept dense by the measured allocation")
    assert "loss +1.0000" in by["3"].reason
    assert by["3"].measured["chosen"] is None
    fact = [e for e in p.layers if e.status == "factorize"]
    assert fact
    for e in fact:
        c = e.measured["chosen"]
        assert c["method"] == "tucker2" and c["ranks"] == e.ranks
        assert e.note.startswith("measured choice of ")
    # the plan records it: in the table and through JSON
    assert "kept dense by the measured allocation" in p.table()
    again = type(p).from_dict(json.loads(p.to_json()))
    assert [e.measured for e in again.layers] == [e.measured for e in p.layers]


def test_measured_allocation_prefers_dense_when_nothing_needs_compressing():
    net = _net()
    table = _handmade(net, lambda n, f: 0.01)
    whole = summarize(net, SHAPE).total_macs  # an absolute budget the dense model already meets
    p = plan(net, _measured_cfg(whole), drops=table, input_shape=SHAPE, progress=False)
    assert all(e.status == "dense" for e in p.layers)
    assert all(e.measured["value"] == 0.0 for e in p.layers)


def test_measured_allocation_noise_is_clamped_and_made_monotone():
    net = _net()
    # negative readings (noise) and a smaller rung that reads better than a larger one
    table = _handmade(net, lambda n, f: {0.6: -0.05, 0.3: 0.04, 0.1: 0.01}[f])
    p = plan(net, _measured_cfg(0.9), drops=table, input_shape=SHAPE, progress=False)
    vals = [e.measured["value"] for e in p.layers if e.measured and e.measured["chosen"]]
    assert vals and all(v >= 0 for v in vals)
    for e in p.layers:
        if e.measured and e.measured["chosen"] and e.measured["chosen"]["loss_increase"] == 0.01:
            assert e.measured["value"] == pytest.approx(0.04)  # not below the larger rung's


def test_measured_allocation_refuses_a_table_without_a_listed_layer():
    net = _net()
    table = _handmade(net, lambda n, f: 0.01)
    table.layers = table.layers[1:]
    with pytest.raises(TensorcutError, match="no entry for layer '1'"):
        plan(net, _measured_cfg(0.5), drops=table, input_shape=SHAPE, progress=False)


def test_measured_budget_that_cannot_be_met_uses_the_cheapest_options():
    net = _net()
    table = _handmade(net, lambda n, f: 0.01)
    with pytest.warns(UserWarning):
        p = plan(net, _measured_cfg(0.01), drops=table, input_shape=SHAPE, progress=False)
    fact = [e for e in p.layers if e.status == "factorize"]
    assert fact and all("budget not met" in e.note for e in fact)
