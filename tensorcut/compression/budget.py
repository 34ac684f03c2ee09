"""Budget allocation: a model-wide parameter or MAC budget split over the listed layers by
rank ladders (each layer's candidates ordered by size, scored by kernel error)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from tensorcut.compression import cost
from tensorcut.compression._builder import Builder, finalize, make_entry, rel_error, smallest_within
from tensorcut.compression.config import DEFAULT_METHOD, CompressConfig
from tensorcut.compression.plan import LayerPlan
from tensorcut.compression.rank import (
    Candidate,
    LayerLadder,
    align_ranks,
    allocate_budget,
    scaled_ranks,
)
from tensorcut.errors import ConvergenceError, TensorcutError

__all__ = ["BUDGET_SCALES", "plan_budget"]

#: the fractions of each mode's maximal rank a layer's ladder tries
BUDGET_SCALES = (1.0, 0.75, 0.55, 0.4, 0.3, 0.22, 0.16, 0.12, 0.08, 0.05, 0.03, 0.015)


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
        for s in BUDGET_SCALES:
            r = scaled_ranks(mx, s)
            if cfg.align > 1:
                r = align_ranks(r, mx, cfg.align)
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
                weight=float(sensitivity.get(n, 1.0)) * b.geom.dense_params(),
                evaluate=evaluate,
            )
        )

    def cost_of(n: str) -> int:
        g = builders[n].geom
        return g.dense_params() if kind == "params" else builders[n].dense_macs()

    fixed_cost = sum(e.params_before if kind == "params" else e.macs_before for e in fixed.values())
    listed = sum(cost_of(n) for n in chosen) + fixed_cost
    unladdered = sum(cost_of(n) for n in chosen if n in entries) + fixed_cost
    if cfg.budget < 1:  # type: ignore[operator]
        # a fraction of the listed conv layers' dense cost
        met = allocate_budget(ladders, cfg.budget * listed, kind, fixed_cost=unladdered)  # type: ignore[operator]
    else:
        # an absolute count for the whole model
        whole = mc.total_params if kind == "params" else mc.total_macs
        met = allocate_budget(ladders, cfg.budget, kind, fixed_cost=whole - listed + unladdered)  # type: ignore[arg-type]
    built: dict[str, nn.Module] = {}
    for l in ladders:
        b = builders[l.name]
        if l.choice < 0:
            entries[l.name] = make_entry(
                l.name,
                b,
                sizes[l.name],
                method,
                "dense",
                "budget met without compressing this layer",
            )
            continue
        c = l.candidates[l.choice]
        try:
            layer = b.build(method, c.ranks)
        except (TensorcutError, ConvergenceError) as err:
            entries[l.name] = make_entry(
                l.name,
                b,
                sizes[l.name],
                method,
                "dense",
                f"{method} failed at ranks {c.ranks}: {err}",
            )
            continue
        e = make_entry(
            l.name,
            b,
            sizes[l.name],
            method,
            "factorize",
            "",
            layer=layer,
            note="" if met else "budget not met: smallest candidates used",
        )
        if cfg.method == "auto" and e.error is not None:
            # the allocation gave this layer an error share; keep the smallest method that meets it
            e, layer = smallest_within(l.name, b, sizes[l.name], e, layer)
        entries[l.name] = finalize(e, b, layer, cfg, sizes[l.name])
        if entries[l.name].status == "factorize":
            built[l.name] = layer
    return entries, built
