"""Plans that target speed: ranks chosen from latencies measured on this device and thread count.

The rule itself is part of the planner (:mod:`tensorcut.compression.speed_plan`;
``tensorcut.plan(model, target_speedup=X, ...)`` or ``tensorcut compress --target-speedup X``).
:func:`plan_for_speedup` is its keyword form with every measurement knob, and this module
re-exports the pieces (:class:`LatencyCache`, :func:`check_speedup`, :func:`describe_speed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from tensorcut.compression.config import CompressConfig
from tensorcut.compression.plan import Plan
from tensorcut.compression.planner import plan
from tensorcut.compression.speed_plan import (
    DEFAULT_SCALES,
    NOT_FASTER,
    LatencyCache,
    SpeedCheck,
    SpeedOptions,
    check_speedup,
    describe_speed,
)

__all__ = [
    "DEFAULT_SCALES",
    "NOT_FASTER",
    "LatencyCache",
    "SpeedCheck",
    "SpeedOptions",
    "check_speedup",
    "describe_speed",
    "plan_for_speedup",
]


def plan_for_speedup(
    model: nn.Module,
    target_speedup: float,
    input_shape: Sequence[int],
    method: str = "tucker2",
    *,
    threads: int | None = None,
    batch: int = 1,
    layers: Sequence[str] | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    align: int = 8,
    channels_last: bool = True,
    warmup: int = 2,
    reps: int = 9,
    cache: str | Path | LatencyCache | None = None,
    verify: bool = False,
    decompose_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> Plan:
    """A :class:`~tensorcut.compression.Plan` whose predicted whole-model latency is
    ``dense / target_speedup`` (``target_speedup`` > 1).

    ``model`` (evaluation mode is used) is timed on this device with ``threads`` torch threads
    (None: the current setting) at batch ``batch`` and input ``input_shape`` (C, H, W). Candidate
    layers: ``layers`` by name, or tensorcut's default filter (convolutions with more than 3
    input channels; depthwise and layers the method refuses stay dense with its reason). Each
    candidate is timed dense and at ``scales`` of its reference ranks (rounded down to multiples
    of ``align``); only measurably faster forms are kept, the others give ``not faster``. Ranks are
    then allocated greedily by kernel-error increase per ms saved. When even the fastest forms
    miss the target, the plan says so in ``config["speed"]["met"]``. ``verify=True`` applies the
    plan to a copy, measures both whole models (:func:`check_speedup`) and returns an all-dense plan
    when the compressed model is not measurably faster. The plan's ``config["speed"]`` holds
    ``target_speedup``, ``dense_ms``, ``predicted_ms``, ``predicted_speedup``, ``met`` and, with
    ``verify``, ``measured_ms`` / ``measured_speedup`` / ``measured``. ``decompose_options`` go to
    the final per-layer decompositions (as ``CompressConfig.options[method]``, e.g.
    ``{"hooi": False}``).
    """
    cfg = CompressConfig(
        method=method,
        target_speedup=target_speedup,
        align=align,
        options={method: dict(decompose_options)} if decompose_options else {},
    )
    opts = SpeedOptions(
        threads=threads,
        batch=batch,
        scales=tuple(scales),
        channels_last=channels_last,
        warmup=warmup,
        reps=reps,
        cache=cache,
        verify=verify,
        progress=progress,
    )
    return plan(
        model,
        cfg,
        input_shape=tuple(input_shape),
        layers=layers,
        progress=False,
        speed=opts,
    )
