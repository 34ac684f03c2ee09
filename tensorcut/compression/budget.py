"""Budget allocation: a model-wide parameter or MAC budget split over the listed layers by
rank ladders (each layer's candidates ordered by size, scored by relative kernel error times
the layer's sensitivity; :func:`tensorcut.compression.rank.allocate_budget` evens the weighted
error out across layers) — or, with ``allocation="measured"``, by accuracy costs measured per
layer at several ranks (:func:`plan_measured`, an exact multiple-choice knapsack)."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from torch import nn

from tensorcut.compression import cost
from tensorcut.compression._builder import Builder, finalize, make_entry, rel_error, smallest_within
from tensorcut.compression.config import DEFAULT_METHOD, CompressConfig
from tensorcut.compression.knapsack import solve_mckp
from tensorcut.compression.measured import DropTable, LayerDrops, MeasuredOption
from tensorcut.compression.plan import LayerPlan
from tensorcut.compression.rank import (
    Candidate,
    LayerLadder,
    align_ranks,
    allocate_budget,
    ranks_for_ratio,
    scaled_ranks,
)
from tensorcut.errors import ConvergenceError, TensorcutError

__all__ = ["BUDGET_SCALES", "FRACTIONS", "RULES", "plan_budget", "plan_measured"]

#: the fractions of each mode's maximal rank a layer's ladder tries (parameter budgets)
BUDGET_SCALES = (1.0, 0.75, 0.55, 0.4, 0.3, 0.22, 0.16, 0.12, 0.08, 0.05, 0.03, 0.015)
#: the fractions of the layer's parameters a layer's ladder tries (MAC budgets)
FRACTIONS = tuple(k / 100 for k in range(99, 0, -1))

#: allocation rule per budget kind, chosen by measurement (issue 16; trained full-width resnet20,
#: Fashion-MNIST validation top-1 after BatchNorm re-estimation, no fine-tuning): under a MAC
#: budget evening the relative kernel error out squeezed the 16-channel convs, whose kernels lose
#: less at a given rank fraction, and lost 0.6 / 2.4 / 2.1 points to uniform ranks at 2x / 3x / 4x
#: fewer MACs; keeping the same parameter fraction per layer (``fraction``, on a fine ladder)
#: matched uniform ranks and leaves sensitivity to scale it per layer. Under a parameter budget
#: min-max error beat uniform ranks by 0.4 / 1.0 / 1.8 points at 2x / 3x / 4x fewer parameters.
RULES = {"macs": "fraction", "params": "minmax"}


def plan_budget(
    chosen: list[str],
    builders: dict[str, Builder],
    cfg: CompressConfig,
    sensitivity: dict[str, float],
    mc: cost.ModelCost,
    it: Any,
    fixed: dict[str, LayerPlan],
) -> tuple[dict[str, LayerPlan], dict[str, nn.Module]]:
    """Split a model-wide budget over the ``chosen`` layers; ``fixed`` are selected layers that stay
    dense whatever the budget (their cost counts against it)."""
    sizes = {n: builders[n].hw for n in chosen}
    kind = cfg.budget_kind
    method = DEFAULT_METHOD if cfg.method == "auto" else cfg.method
    ladders: list[LayerLadder] = []
    entries: dict[str, LayerPlan] = {}
    for n in it:
        b = builders[n]
        cls = b.cls(method)
        try:
            mx = tuple(cls.max_ranks(b.geom))
        except TensorcutError as e:
            entries[n] = make_entry(n, b, sizes[n], method, "dense", str(e))
            continue
        cands, seen = [], set()
        for s in BUDGET_SCALES if kind == "params" else FRACTIONS:
            if kind == "params":
                r = scaled_ranks(mx, s)
                if cfg.align > 1:
                    r = align_ranks(r, mx, cfg.align)
            else:  # the ranks the ratio rule gives for keeping fraction s of the parameters
                r = ranks_for_ratio(
                    mx, partial(b.params, method), s * b.geom.dense_params(), cfg.align
                )
            p = b.params(method, r)
            if r in seen or p >= b.geom.dense_params():
                continue
            seen.add(r)
            cands.append(Candidate(r, p, b.macs(method, r)))

        def evaluate(i: int, b: Builder = b, cands: list[Candidate] = cands, n: str = n) -> float:
            try:
                layer = b.build(method, cands[i].ranks, fast=True)
            except (TensorcutError, ConvergenceError):
                return math.inf
            return rel_error(b.conv.weight, layer)

        if not cands:
            entries[n] = make_entry(
                n,
                b,
                sizes[n],
                method,
                "dense",
                f"no {method} factorization is smaller than the dense layer",
            )
            continue
        ladders.append(
            LayerLadder(
                n,
                b.geom.dense_params(),
                b.dense_macs(),
                cands,
                # scale-free: the relative error needs no size factor (weighting it by the
                # layer's parameters crushed small-but-costly layers under a MAC budget)
                weight=float(sensitivity.get(n, 1.0)),
                evaluate=evaluate,
            )
        )

    def cost_of(n: str) -> int:
        g = builders[n].geom
        return g.dense_params() if kind == "params" else builders[n].dense_macs()

    fixed_cost = sum(e.params_before if kind == "params" else e.macs_before for e in fixed.values())
    listed = sum(cost_of(n) for n in chosen) + fixed_cost
    unladdered = sum(cost_of(n) for n in chosen if n in entries) + fixed_cost
    assert cfg.budget is not None, "plan_budget needs cfg.budget"
    amount = float(cfg.budget)
    if amount < 1:  # a fraction of the listed conv layers' dense cost
        met = allocate_budget(
            ladders, amount * listed, kind, fixed_cost=unladdered, rule=RULES[kind]
        )
    else:  # an absolute count for the whole model
        whole = mc.total_params if kind == "params" else mc.total_macs
        met = allocate_budget(
            ladders, amount, kind, fixed_cost=whole - listed + unladdered, rule=RULES[kind]
        )
    built: dict[str, nn.Module] = {}
    for lad in ladders:
        b = builders[lad.name]
        if lad.choice < 0:
            entries[lad.name] = make_entry(
                lad.name,
                b,
                sizes[lad.name],
                method,
                "dense",
                "budget met without compressing this layer",
            )
            continue
        c = lad.candidates[lad.choice]
        try:
            layer = b.build(method, c.ranks)
        except (TensorcutError, ConvergenceError) as err:
            entries[lad.name] = make_entry(
                lad.name,
                b,
                sizes[lad.name],
                method,
                "dense",
                f"{method} failed at ranks {c.ranks}: {err}",
            )
            continue
        entry = make_entry(
            lad.name,
            b,
            sizes[lad.name],
            method,
            "factorize",
            "",
            layer=layer,
            note="" if met else "budget not met: smallest candidates used",
        )
        kept: nn.Module = layer
        if cfg.method == "auto" and entry.error is not None:
            # the allocation gave this layer an error share; keep the smallest method that meets it
            entry, kept = smallest_within(lad.name, b, sizes[lad.name], entry, layer)
        entries[lad.name] = finalize(entry, b, kept, cfg, sizes[lad.name])
        if entries[lad.name].status == "factorize":
            built[lad.name] = kept
    return entries, built


def _monotone(options: list[tuple[int, MeasuredOption]], objective: str) -> dict[int, float]:
    """Each option's cost for the knapsack: its measured value, at least 0 (a layer compressed
    alone does not really improve the model; a negative reading is calibration noise) and at
    least the value of any option of the same method that keeps more parameters (noise again:
    fewer ranks cannot lose less)."""
    out: dict[int, float] = {}
    by_method: dict[str, list[tuple[int, MeasuredOption]]] = {}
    for i, o in options:
        by_method.setdefault(o.method, []).append((i, o))
    for rows in by_method.values():
        worst = 0.0
        for i, o in sorted(rows, key=lambda t: -t[1].params):
            worst = max(worst, o.value(objective))
            out[i] = worst
    return out


def _describe(o: MeasuredOption, ld: LayerDrops, kind: str) -> str:
    """``tucker2 8x8 at 31% of the dense MACs: loss +0.0123, top-1 -0.40 pt``."""
    return (
        f"{o.method} {'x'.join(map(str, o.ranks))} at {o.cost(kind) / ld.dense_cost(kind):.0%} of "
        f"the dense {kind}: loss {o.loss_increase:+.4f}, top-1 {-100 * o.top1_drop:+.2f} pt"
    )


def plan_measured(
    chosen: list[str],
    builders: dict[str, Builder],
    cfg: CompressConfig,
    drops: DropTable,
    mc: cost.ModelCost,
    it: Any,
    fixed: dict[str, LayerPlan],
) -> tuple[dict[str, LayerPlan], dict[str, nn.Module]]:
    """Split a budget by measured accuracy costs: per layer dense or one measured option, the
    least summed cost (``drops.objective``) within the budget, solved exactly
    (:func:`tensorcut.compression.knapsack.solve_mckp`); ``fixed`` layers stay dense and count.

    The budget reads as in :func:`plan_budget` (below 1: a fraction of the listed layers' dense
    cost; otherwise an absolute whole-model count). A layer's options are dense (cost: its dense
    cost, value 0) and every measured option of the config's method (``auto``: every measured
    method) cheaper than dense; values are clamped to >= 0 and made monotone along each method's
    ladder (:func:`_monotone`). Each entry records its choice in ``LayerPlan.measured`` and says
    why in its note (factorized) or reason (dense). When even the cheapest options miss the
    budget, each layer takes its cheapest option and the note says so.

    Raises:
        TensorcutError: a listed layer the table lacks, or measured on another geometry.
    """
    kind = cfg.budget_kind
    objective = drops.objective
    allowed = set(drops.methods) if cfg.method == "auto" else {cfg.method}
    names: list[str] = []
    groups: list[list[tuple[float, float]]] = []
    offered: list[list[MeasuredOption | None]] = []
    for n in it:
        b = builders[n]
        ld = drops.layer(n)
        if ld is None:
            raise TensorcutError(
                f"the measured drops have no entry for layer {n!r}; measure the layers this plan "
                "lists (measure_layer_drops with the same filter_fn / layers)"
            )
        if ld.dense_macs != b.dense_macs() or ld.dense_params != b.geom.dense_params():
            raise TensorcutError(
                f"the drops of {n!r} were measured on another layer or input size (dense MACs "
                f"{ld.dense_macs:,} vs {b.dense_macs():,} here); measure this model at this input"
            )
        dense_cost = ld.dense_cost(kind)
        usable = [
            (i, o)
            for i, o in enumerate(ld.options)
            if o.method in allowed and o.cost(kind) < dense_cost and o.params < ld.dense_params
        ]
        values = _monotone(usable, objective)
        names.append(n)
        groups.append(
            [(float(dense_cost), 0.0)] + [(float(o.cost(kind)), values[i]) for i, o in usable]
        )
        offered.append([None] + [o for _, o in usable])

    def cost_of(n: str) -> int:
        g = builders[n].geom
        return g.dense_params() if kind == "params" else builders[n].dense_macs()

    fixed_cost = sum(e.params_before if kind == "params" else e.macs_before for e in fixed.values())
    listed = sum(cost_of(n) for n in chosen) + fixed_cost
    assert cfg.budget is not None, "plan_measured needs cfg.budget"
    amount = float(cfg.budget)
    if amount < 1:
        total, other = amount * listed, fixed_cost
    else:
        whole = mc.total_params if kind == "params" else mc.total_macs
        total, other = amount, whole - listed + fixed_cost
    choice = solve_mckp(groups, total - other)
    met = choice is not None
    if choice is None:  # even the cheapest options miss: take them
        choice = [min(range(len(g)), key=lambda i: g[i]) for g in groups]
    entries: dict[str, LayerPlan] = {}
    built: dict[str, nn.Module] = {}
    method = DEFAULT_METHOD if cfg.method == "auto" else cfg.method
    for n, g, opts, k in zip(names, groups, offered, choice, strict=True):
        b = builders[n]
        ld = drops.layer(n)
        assert ld is not None  # checked above
        record: dict[str, Any] = {
            "objective": objective,
            "kind": kind,
            "dense_cost": ld.dense_cost(kind),
            "options": len(g),
            "value": g[k][1],
            "budget_met": met,
            "chosen": None,
        }
        o = opts[k]
        if o is None:
            # why dense: the option that saves the most cost per unit of measured value
            alt = [
                (v / max(ld.dense_cost(kind) - c, 1), oo)
                for (c, v), oo in zip(g[1:], opts[1:], strict=True)
                if oo is not None
            ]
            why = (
                "no measured option is smaller than the dense layer"
                if not alt
                else "kept dense by the measured allocation: its best option, "
                + _describe(min(alt, key=lambda t: t[0])[1], ld, kind)
                + ", costs more per unit saved than the other layers' choices"
            )
            entries[n] = make_entry(n, b, b.hw, method, "dense", why)
            entries[n].measured = record
            continue
        record["chosen"] = {
            "method": o.method,
            "ranks": list(o.ranks),
            "cost": o.cost(kind),
            "loss_increase": o.loss_increase,
            "top1_drop": o.top1_drop,
        }
        try:
            layer = b.build(o.method, tuple(o.ranks))
        except (TensorcutError, ConvergenceError) as err:
            entries[n] = make_entry(
                n, b, b.hw, o.method, "dense", f"{o.method} failed at ranks {o.ranks}: {err}"
            )
            entries[n].measured = record
            continue
        note = f"measured choice of {len(g)} options: " + _describe(o, ld, kind)
        if not met:
            note += "; budget not met: cheapest options used"
        entry = make_entry(n, b, b.hw, o.method, "factorize", "", layer=layer, note=note)
        entries[n] = finalize(entry, b, layer, cfg, b.hw)
        entries[n].measured = record
        if entries[n].status == "factorize":
            built[n] = layer
    return entries, built
