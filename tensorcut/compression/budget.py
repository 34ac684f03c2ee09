"""Budget allocation: a model-wide parameter or MAC budget split over the listed layers by
rank ladders (each layer's candidates ordered by size, scored by relative kernel error times
the layer's sensitivity; :func:`tensorcut.compression.rank.allocate_budget` evens the weighted
error out across layers)."""

from __future__ import annotations

import math
from functools import partial
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
    ranks_for_ratio,
    scaled_ranks,
)
from tensorcut.errors import ConvergenceError, TensorcutError

__all__ = ["BUDGET_SCALES", "FRACTIONS", "RULES", "plan_budget"]

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
