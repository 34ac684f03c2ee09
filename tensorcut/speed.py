"""Plans that target speed: ranks chosen from latencies measured on this device and thread count.

:func:`plan_for_speedup` times every candidate convolution dense and factorized at a few ranks
(with :func:`tensorcut.timing.measure_latency`, interleaved, on the layer's real input size),
keeps only candidates that are measurably faster than the dense layer, then allocates ranks
greedily: starting from the dense model, it repeatedly takes the layer move with the smallest
increase in kernel error per millisecond saved until the predicted whole-model latency reaches
``dense / target_speedup``. Layers with no faster factorized form stay dense with the reason
``not faster``. The result is an ordinary :class:`tensorcut.compression.Plan` (apply it with
``tensorcut.compression.apply``); its ``config["speed"]`` records the target, the dense and
predicted whole-model latencies and how they were measured. :func:`check_speedup` applies a plan
to a copy and measures dense vs compressed whole models, so the plan's prediction can be
compared with what the model really does; :func:`plan_for_speedup` with ``verify=True`` does this
and, when the compressed model is not measurably faster than dense, returns an all-dense plan:
a plan made for speed is never slower than dense on the machine that made it.

Measured latencies are cached (in memory, and in a JSON file when ``cache`` is a path) keyed by
device, threads, batch, the layer's geometry, method, ranks and input size.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.layers.base import LAYER_REGISTRY, ConvGeometry
from tensorcut.timing import (
    Comparison,
    LatencyStats,
    compare,
    measure_latency,
    to_memory_format,
)

__all__ = [
    "DEFAULT_SCALES",
    "LatencyCache",
    "SpeedCheck",
    "check_speedup",
    "describe_speed",
    "plan_for_speedup",
]

#: Candidate ranks per layer: these fractions of the method's reference ranks
#: (``FactorizedConv2d.reference_ranks``: the maximal ranks, CP's MAC-equal rank).
DEFAULT_SCALES = (0.75, 0.5, 0.375, 0.25, 0.125)

NOT_FASTER = "not faster"


class LatencyCache:
    """Per-layer median latencies (ms), keyed by device, threads, batch, geometry, method, ranks and
    input size; persisted as JSON when given a path (written atomically)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.data: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise TensorcutError(
                    f"cannot read latency cache {self.path}: {e}; delete it to start afresh"
                ) from None
            if not isinstance(raw, dict) or raw.get("format") != "tensorcut-latency-cache":
                raise TensorcutError(
                    f"{self.path} is not a tensorcut latency cache; delete it or pick another path"
                )
            self.data = {str(k): float(v) for k, v in raw.get("entries", {}).items()}

    @staticmethod
    def key(
        device: str,
        threads: int,
        batch: int,
        geom: ConvGeometry,
        method: str,
        ranks: Sequence[int] | None,
        hw: tuple[int, int],
        channels_last: bool,
    ) -> str:
        """The cache key (``ranks`` None: the dense layer)."""
        return json.dumps(
            [
                device,
                threads,
                batch,
                geom.to_dict(),
                method if ranks is not None else "dense",
                list(ranks) if ranks is not None else None,
                list(hw),
                channels_last,
            ],
            sort_keys=True,
        )

    def get(self, key: str) -> float | None:
        return self.data.get(key)

    def put(self, key: str, ms: float) -> None:
        self.data[key] = float(ms)

    def save(self) -> None:
        """Write the cache file (when there is one)."""
        if self.path is None:
            return
        from tensorcut.io import atomic_write_text

        atomic_write_text(
            self.path, json.dumps({"format": "tensorcut-latency-cache", "entries": self.data})
        )


@dataclass
class _Candidate:
    ranks: tuple[int, ...]
    ms: float
    error: float  # relative kernel error ||W - W~|| / ||W|| (0 for dense)
    faster: bool = True


@dataclass
class _Layer:
    name: str
    conv: nn.Conv2d
    geom: ConvGeometry
    hw: tuple[int, int]
    dense_ms: float
    cands: list[_Candidate] = field(
        default_factory=list
    )  # faster candidates, by decreasing latency
    choice: int = -1  # -1: dense
    reason: str = ""

    @property
    def ms(self) -> float:
        return self.dense_ms if self.choice < 0 else self.cands[self.choice].ms

    @property
    def error(self) -> float:
        return 0.0 if self.choice < 0 else self.cands[self.choice].error


def _candidate_ranks(
    method: str, geom: ConvGeometry, hw: tuple[int, int], scales: Sequence[float], align: int
) -> list[tuple[int, ...]]:
    from tensorcut.compression.rank import align_ranks, scaled_ranks

    cls = LAYER_REGISTRY[method]
    mx = tuple(cls.max_ranks(geom))
    ref = tuple(cls.reference_ranks(geom))
    out: list[tuple[int, ...]] = []
    for s in scales:
        r = scaled_ranks(ref, s)
        if align > 1:
            r = align_ranks(r, mx, align)
        r = tuple(min(a, m) for a, m in zip(r, mx, strict=True))
        if r not in out and cls.predicted_macs(geom, r, hw) < geom.dense_macs(hw):
            out.append(r)
    return out


def _conv_inputs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, int]]:
    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):

            def hook(mod: nn.Module, inp: Any, out: Any, name: str = name) -> None:
                sizes.setdefault(name, (int(inp[0].shape[-2]), int(inp[0].shape[-1])))

            hooks.append(m.register_forward_hook(hook))
    p = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _error(conv: nn.Conv2d, method: str, ranks: tuple[int, ...], cache: dict[str, Any]) -> float:
    """Relative kernel error ``||W - W~|| / ||W||`` of ``method`` at ``ranks``.

    The method's cheap bound (:meth:`FactorizedConv2d.error_bound`, e.g. Tucker-2's truncated
    HOSVD tail, computed from spectra kept in ``cache`` per layer) where it has one; otherwise a
    real decomposition, measured.
    """
    cls = LAYER_REGISTRY[method]
    bound = cls.error_bound(conv.weight, ConvGeometry.from_conv(conv), tuple(ranks), cache)
    if bound is not None:
        return float(bound)
    W = conv.weight.detach().to(torch.float64)
    norm = float(torch.linalg.vector_norm(W))
    if norm == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = cls.from_conv(conv, ranks=ranks)
    err = getattr(layer, "rel_error", None)
    if err is None:
        err = float(torch.linalg.vector_norm(W - layer.reconstruct_weight().detach().to(W))) / norm
    return float(err)


def _time_layer(
    conv: nn.Conv2d,
    geom: ConvGeometry,
    hw: tuple[int, int],
    method: str,
    cands: list[tuple[int, ...]],
    *,
    batch: int,
    threads: int | None,
    warmup: int,
    reps: int,
    channels_last: bool,
    cache: LatencyCache,
) -> tuple[float, dict[tuple[int, ...] | None, LatencyStats | float]]:
    """Dense and candidate latencies of one layer (ms), measured together unless all are cached.

    The candidates are keyed by their ranks; key None holds the dense layer's statistics when
    they were measured now.
    """
    p = conv.weight
    device = p.device.type
    n_threads = threads if threads is not None else torch.get_num_threads()
    keys: dict[tuple[int, ...] | None, str] = {
        None: LatencyCache.key(device, n_threads, batch, geom, method, None, hw, channels_last)
    }
    keys.update(
        {
            r: LatencyCache.key(device, n_threads, batch, geom, method, r, hw, channels_last)
            for r in cands
        }
    )
    hits = {r: ms for r, k in keys.items() if (ms := cache.get(k)) is not None}
    if len(hits) == len(keys):
        return float(hits[None]), {r: float(hits[r]) for r in cands}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, geom.in_channels, *hw, dtype=p.dtype, device=p.device).contiguous(
        memory_format=fmt
    )
    models: dict[str, nn.Module] = {"dense": to_memory_format(copy.deepcopy(conv).eval(), fmt)}
    cls = LAYER_REGISTRY[method]
    for r in cands:
        layer = cls(geom, r, device=p.device, dtype=p.dtype)
        layer.reset_parameters()  # latency does not depend on the values
        models["x".join(map(str, r))] = to_memory_format(layer.eval(), fmt)
    st = measure_latency(models, x, threads=threads, warmup=warmup, reps=reps)
    out: dict[tuple[int, ...] | None, LatencyStats | float] = {
        r: st["x".join(map(str, r))] for r in cands
    }
    cache.put(keys[None], st["dense"].median_ms)
    for r in cands:
        cache.put(keys[r], st["x".join(map(str, r))].median_ms)
    return st["dense"].median_ms, {**out, None: st["dense"]}


def _faster(s: LatencyStats | float, dense: LatencyStats | float | None, dense_ms: float) -> bool:
    """Measurably faster than dense (paired IQR below 1), or, for cached medians, a lower median."""
    if isinstance(s, LatencyStats) and isinstance(dense, LatencyStats):
        c = compare(s, dense)
        return c.measurable and c.ratio < 1
    return float(s if not isinstance(s, LatencyStats) else s.median_ms) < dense_ms


def _allocate(layers: list[_Layer], goal_ms: float, dense_total: float) -> float:
    """Greedy: the move with the least squared-error increase per ms saved, until ``goal_ms``."""
    total = dense_total
    while total > goal_ms:
        best: tuple[float, int, int] | None = None
        for li, L in enumerate(layers):
            for j in range(L.choice + 1, len(L.cands)):
                saved = L.ms - L.cands[j].ms
                if saved <= 0:
                    continue
                cost = (L.cands[j].error ** 2 - L.error**2) / saved
                if best is None or cost < best[0]:
                    best = (cost, li, j)
        if best is None:
            break
        _, li, j = best
        total -= layers[li].ms - layers[li].cands[j].ms
        layers[li].choice = j
    return total


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
) -> Any:
    """A :class:`~tensorcut.compression.Plan` whose predicted whole-model latency is the target.

    The target latency is ``dense / target_speedup``.

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
    from tensorcut.compression import LayerPlan, Plan, default_filter
    from tensorcut.compression import plan as make_plan

    if not target_speedup >= 1.0:
        raise TensorcutError(
            f"target_speedup must be >= 1 (e.g. 1.5 for 1.5x faster), got {target_speedup}"
        )
    if method not in LAYER_REGISTRY:
        raise TensorcutError(
            f"unknown method {method!r}; choose one of: {', '.join(sorted(LAYER_REGISTRY))}"
        )
    if len(tuple(input_shape)) != 3:
        raise TensorcutError(f"input_shape is (C, H, W), got {tuple(input_shape)}")
    lc = cache if isinstance(cache, LatencyCache) else LatencyCache(cache)
    was_training = model.training
    model.eval()
    try:
        convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        if layers is not None:
            unknown = [n for n in layers if n not in convs]
            if unknown:
                raise TensorcutError(
                    f"unknown layer {unknown[0]!r}; conv layers are: {', '.join(convs)}"
                )
            chosen = list(layers)
        else:
            chosen = [n for n, m in convs.items() if default_filter(n, m)]
        if not chosen:
            raise TensorcutError(
                "no convolution to plan for (the default skips stems with <= 3 input channels)"
            )
        sizes = _conv_inputs(model, input_shape)
        p = next(model.parameters())
        x = torch.randn(batch, *input_shape, dtype=p.dtype, device=p.device)
        dense_model = copy.deepcopy(model).eval()
        if channels_last:
            dense_model = to_memory_format(dense_model)
        dense_stats = measure_latency(
            {"dense": dense_model}, x, threads=threads, warmup=warmup, reps=reps
        )["dense"]
        records: list[_Layer] = []
        skipped: dict[str, str] = {}
        for i, name in enumerate(chosen):
            conv = convs[name]
            geom = ConvGeometry.from_conv(conv)
            hw = sizes.get(name)
            if hw is None:
                skipped[name] = "not called in the forward pass"
                continue
            try:
                LAYER_REGISTRY[method](
                    geom, tuple(1 for _ in LAYER_REGISTRY[method].max_ranks(geom))
                )
            except TensorcutError as e:
                skipped[name] = str(e)
                continue
            cands = _candidate_ranks(method, geom, hw, scales, align)
            if not cands:
                skipped[name] = f"no {method} ranks have fewer MACs than the dense layer"
                continue
            dense_ms, timed = _time_layer(
                conv,
                geom,
                hw,
                method,
                cands,
                batch=batch,
                threads=threads,
                warmup=warmup,
                reps=reps,
                channels_last=channels_last,
                cache=lc,
            )
            dense_s = timed.pop(None, None)
            L = _Layer(name, conv, geom, hw, dense_ms)
            spectra: dict[str, Any] = {}
            for r in cands:
                s = timed[r]
                if _faster(s, dense_s, dense_ms):
                    ms = s.median_ms if isinstance(s, LatencyStats) else float(s)
                    L.cands.append(_Candidate(r, ms, _error(conv, method, r, spectra)))
            L.cands.sort(key=lambda c: -c.ms)
            if not L.cands:
                L.reason = NOT_FASTER
            records.append(L)
            if progress:
                print(
                    f"[{i + 1}/{len(chosen)}] {name}: dense {dense_ms:.3f} ms, "
                    f"{len(L.cands)}/{len(cands)} faster forms",
                    file=sys.stderr,
                    flush=True,
                )
        lc.save()
        dense_total = dense_stats.median_ms
        goal = dense_total / target_speedup
        predicted = _allocate(records, goal, dense_total)
        entries: dict[str, Any] = {}
        built: dict[str, nn.Module] = {}
        model_params: int | None = None
        model_macs: int | None = None
        for L in records:
            if L.choice < 0:
                continue
            ranks = L.cands[L.choice].ranks
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sub = make_plan(
                    model,
                    method=method,
                    rank=tuple(ranks),
                    layers=[L.name],
                    input_shape=tuple(input_shape),
                    options={method: dict(decompose_options)} if decompose_options else {},
                    progress=False,
                )
            entry = sub.layers[0]
            entry.latency_ms = {"dense": L.dense_ms, "factorized": L.cands[L.choice].ms}
            entries[L.name] = entry
            built.update(sub._built)
            model_params, model_macs = sub.model_params, sub.model_macs
        for L in records:
            if L.name not in entries:
                entries[L.name] = _dense_entry(
                    LayerPlan,
                    L.name,
                    method,
                    L.geom,
                    L.hw,
                    L.reason or "target met without compressing this layer",
                    {
                        "dense": L.dense_ms,
                        **({"fastest_factorized": L.cands[-1].ms} if L.cands else {}),
                    },
                )
        for name, why in skipped.items():
            g = ConvGeometry.from_conv(convs[name])
            entries[name] = _dense_entry(
                LayerPlan, name, method, g, sizes.get(name, (0, 0)), why, None
            )
        if model_params is None or model_macs is None:  # set together: no layer factorized
            from tensorcut.summary import summarize

            summary = summarize(model, tuple(input_shape))
            model_params, model_macs = summary.total_params, summary.total_macs
        n_threads = dense_stats.threads
        config = {
            "method": method,
            "rank": None,
            "align": align,
            "latency": True,
            "speed": {
                "target_speedup": target_speedup,
                "dense_ms": dense_total,
                "predicted_ms": predicted,
                "predicted_speedup": dense_total / predicted if predicted > 0 else math.inf,
                "met": predicted <= goal * (1 + 1e-9),
                "threads": n_threads,
                "batch": batch,
                "device": dense_stats.device,
                "channels_last": channels_last,
                "dense": dense_stats.describe(),
                "scales": list(scales),
            },
        }
        plan = Plan(
            config=config,
            layers=[entries[n] for n in chosen if n in entries],
            input_shape=list(input_shape),
            model_params=int(model_params),
            model_macs=int(model_macs),
        )
        plan._built = built
    finally:
        model.train(was_training)
    if verify and any(e.status == "factorize" for e in plan.layers):
        check = check_speedup(
            model,
            plan,
            threads=threads,
            batch=batch,
            warmup=warmup,
            reps=reps,
            channels_last=channels_last,
        )
        sp = plan.config["speed"]
        sp.update(
            {
                "measured_ms": check.compressed.median_ms,
                "measured_dense_ms": check.dense.median_ms,
                "measured_speedup": 1.0 / check.comparison.ratio,
                "measured": check.describe(),
            }
        )
        if not (check.comparison.measurable and check.comparison.ratio < 1):
            for i, lp in enumerate(plan.layers):
                if lp.status == "factorize":
                    plan.layers[i] = _dense_entry(
                        LayerPlan,
                        lp.name,
                        method,
                        ConvGeometry.from_dict(lp.geometry),
                        tuple(lp.input_hw),
                        "whole model not faster when measured",
                        lp.latency_ms,
                    )
            plan._built = {}
            sp["fell_back_to_dense"] = True
    return plan


def describe_speed(speed: dict[str, Any]) -> str:
    """The console lines for a plan's ``config["speed"]``: how latency was measured, the target,
    the prediction, and (after the whole-model check) what was measured."""
    th = int(speed.get("threads", 0))
    how = (
        f"{th} thread{'' if th == 1 else 's'}, batch {speed.get('batch')}, "
        f"{speed.get('device')}" + (", channels-last" if speed.get("channels_last") else "")
    )
    target = float(speed["target_speedup"])
    pred = float(speed["predicted_speedup"])
    lines = [
        f"speed target {target:g}x ({how}): dense median {float(speed['dense_ms']):.3f} ms, "
        f"predicted {float(speed['predicted_ms']):.3f} ms ({pred:.2f}x, target "
        + ("met)" if speed.get("met") else "not reached: no faster forms left)")
    ]
    if "measured" in speed:
        lines.append("measured whole model, interleaved with dense:")
        lines.extend("  " + ln for ln in str(speed["measured"]).splitlines())
    if speed.get("fell_back_to_dense"):
        lines.append(
            "the compressed model was not measurably faster than dense here: every layer kept dense"
        )
    return "\n".join(lines)


def _dense_entry(
    LayerPlan: Any,
    name: str,
    method: str,
    geom: ConvGeometry,
    hw: Sequence[int],
    reason: str,
    latency: dict[str, float] | None,
) -> Any:
    hw2 = (int(hw[0]), int(hw[1]))
    macs = geom.dense_macs(hw2) if hw2 != (0, 0) else 0
    return LayerPlan(
        name=name,
        method=method,
        status="dense",
        reason=reason,
        ranks=[],
        params_before=geom.dense_params(),
        params_after=geom.dense_params(),
        macs_before=macs,
        macs_after=macs,
        error=None,
        geometry=geom.to_dict(),
        input_hw=list(hw2),
        latency_ms=latency,
    )


@dataclass(frozen=True)
class SpeedCheck:
    """Dense and compressed whole-model latencies measured together, and their comparison."""

    dense: LatencyStats
    compressed: LatencyStats
    comparison: Comparison

    @property
    def speedup(self) -> float:
        """dense / compressed (median of per-round ratios, inverted)."""
        return 1.0 / self.comparison.ratio

    def describe(self) -> str:
        """Both latencies and the verdict, one line each."""
        return (
            f"dense: {self.dense.describe()}\ncompressed: {self.compressed.describe()}\n"
            f"{self.comparison.describe()}"
        )


def check_speedup(
    model: nn.Module,
    plan: Any,
    *,
    threads: int | None = None,
    batch: int = 1,
    warmup: int = 2,
    reps: int = 9,
    channels_last: bool = True,
) -> SpeedCheck:
    """Apply ``plan`` to a copy of ``model``; time dense vs compressed whole models, interleaved."""
    from tensorcut.compression import apply

    dense = copy.deepcopy(model).eval()
    comp = apply(copy.deepcopy(model), plan).eval()
    if channels_last:
        dense = to_memory_format(dense)
        comp = to_memory_format(comp)
    p = next(model.parameters())
    x = torch.randn(batch, *plan.input_shape, dtype=p.dtype, device=p.device)
    st = measure_latency(
        {"dense": dense, "compressed": comp}, x, threads=threads, warmup=warmup, reps=reps
    )
    return SpeedCheck(st["dense"], st["compressed"], compare(st["compressed"], st["dense"]))
