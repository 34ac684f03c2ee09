"""``plan``: decide, per convolution, the method and ranks; the model is not changed.

Each selected module is resolved to the convolution it computes
(:mod:`tensorcut.compression.effective`),
its activations are captured on one forward pass (:mod:`tensorcut.compression.verify`) and every
proposed swap is checked on them; the one cost model (:mod:`tensorcut.compression.cost`) gives
parameters and MACs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tensorcut.compression import cost
from tensorcut.compression._builder import (
    decide_one,
    finalize,
    verify_entry,
    warn_poor,
)
from tensorcut.compression.budget import plan_budget, plan_measured
from tensorcut.compression.config import CompressConfig, FilterFn
from tensorcut.compression.effective import refuse_scripted
from tensorcut.compression.measured import DropTable, check_measured_args
from tensorcut.compression.plan import Plan
from tensorcut.compression.selection import select_layers
from tensorcut.compression.speed_plan import SpeedOptions, finish_speed_plan, plan_speed
from tensorcut.errors import TensorcutError

__all__ = ["plan"]


def plan(
    model: nn.Module,
    config: CompressConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    calibration: torch.Tensor | tuple[Any, ...] | None = None,
    sensitivity: dict[str, float] | None = None,
    layers: Sequence[str] | None = None,
    progress: bool = True,
    speed: SpeedOptions | None = None,
    drops: DropTable | None = None,
    **kwargs: Any,
) -> Plan:
    """Decide, per convolution, the method and ranks (the model is not modified).

    Each selected module is first resolved to the plain convolution it computes
    (:mod:`tensorcut.compression.effective`; unknown subclasses stay dense with their reason), and
    every
    proposed swap is checked on the layer's real input captured from one forward pass
    (:mod:`tensorcut.compression.verify`); the measured output error is recorded per layer.

    Args:
        model: any module with ``nn.Conv2d`` layers (timm and torchvision networks included).
        config: a :class:`CompressConfig`, or give its fields as keyword arguments.
        filter_fn: ``filter_fn(name, module) -> bool`` selects layers (default
        :func:`default_filter`).
        input_shape: (C, H, W) of one image, for MACs and the checks (default: from ``calibration``,
            else the first conv's channels at 32x32, with a warning).
        calibration: an input batch ``(N, C, H, W)`` (or a tuple of the forward's positional
            arguments) whose activations are captured to check every swap; default: two random
            images.
        sensitivity: layer name -> weight (e.g. accuracy drop per norm loss from the truncation
            study): under a budget, sensitive layers are compressed more mildly.
        layers: explicit layer names instead of ``filter_fn``.
        progress: show a progress bar (on a terminal).
        speed: how a ``target_speedup`` plan measures (threads, batch, cache, ...; default
            :class:`~tensorcut.compression.speed_plan.SpeedOptions`: the current threads, batch 1,
            the whole model verified against dense).
        drops: per-layer accuracy costs measured at several ranks
            (:func:`tensorcut.compression.measured.measure_layer_drops`), for
            ``allocation="measured"``: the budget then goes to the choice per layer (dense, or a
            method at measured ranks) with the least summed measured loss increase (or top-1
            drop), solved exactly as a multiple-choice knapsack; each entry records its choice.

    Returns:
        A JSON-serialisable :class:`Plan`.

    Raises:
        TensorcutError: bad options, no conv layer, a filter that selects nothing, a calibration
            batch of the wrong shape, or a forward pass that fails on the given input.

    Example:
        >>> p = plan(model, method="tucker2", ratio=0.3, input_shape=(3, 32, 32))
        >>> print(p.table())
    """
    refuse_scripted(model)
    cfg = config or CompressConfig(**kwargs)
    if config is not None and kwargs:
        raise TensorcutError("give either a CompressConfig or keyword options, not both")
    if cfg.target_speedup is not None and sensitivity:
        raise TensorcutError(
            "sensitivity guides a budget's allocation, not a target_speedup plan; drop one of them"
        )
    if sensitivity and cfg.budget is None and cfg.target_speedup is None:
        raise TensorcutError(
            "sensitivity guides a budget's allocation; give a budget too (or drop sensitivity)"
        )
    check_measured_args(cfg, drops, sensitivity)
    sel = select_layers(
        model, cfg, filter_fn, layers=layers, input_shape=input_shape, calibration=calibration
    )
    chosen, convs, aliases, builders = sel.chosen, sel.convs, sel.aliases, sel.builders
    entries, cap, mc, args, shape = sel.entries, sel.capture, sel.cost, sel.args, sel.shape
    units = {id(u.module): u for u in mc.units}
    built: dict[str, nn.Module] = {}
    rule = cfg.rule
    todo = [n for n in chosen if n in builders]
    it = tqdm(todo, desc="plan", leave=False, disable=None if progress else True)
    speed_opts = speed or SpeedOptions()
    speed_record: dict[str, Any] | None = None
    if cfg.target_speedup is not None:
        got, built, speed_record = plan_speed(model, todo, builders, cfg, shape, speed_opts, it)
        entries.update(got)
    elif cfg.budget is None:
        for n in it:
            b = builders[n]
            e, layer = decide_one(n, b, b.hw, cfg, rule)
            entries[n] = finalize(e, b, layer, cfg, b.hw)
            if layer is not None and entries[n].status == "factorize":
                built[n] = layer
    elif cfg.allocation == "measured":
        assert drops is not None  # check_measured_args
        fixed = {n: entries[n] for n in chosen if n in entries}
        got, built = plan_measured(todo, builders, cfg, drops, mc, it, fixed)
        entries.update(got)
    else:
        fixed = {n: entries[n] for n in chosen if n in entries}
        got, built = plan_budget(todo, builders, cfg, sensitivity or {}, mc, it, fixed)
        entries.update(got)
    for n in chosen:
        e = entries[n]
        m = convs[n]
        e.aliases = list(aliases[n])
        e.params_before = cost.unit_params(m)
        u = units.get(id(m))
        if u is not None:
            e.macs_before, e.calls = u.macs, u.calls
        if n in builders:
            e.kind = builders[n].kind
        if e.status == "factorize" and n in built:
            verify_entry(e, builders[n], built[n], cap, m)
            if e.status != "factorize":
                built.pop(n)
        if sensitivity and n in sensitivity:
            e.sensitivity = float(sensitivity[n])
    warn_poor([entries[n] for n in chosen], rule.kind)
    p = Plan(
        config=cfg.to_dict(),
        layers=[entries[n] for n in chosen],
        input_shape=shape,
        model_params=mc.total_params,
        model_macs=mc.total_macs,
    )
    p._built = built
    p._reference = (args, cap.model_output)
    if speed_record is not None:  # after each swap's check: the whole model against dense
        finish_speed_plan(model, p, speed_record, speed_opts)
    return p
