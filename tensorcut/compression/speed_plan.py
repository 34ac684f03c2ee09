"""The speed rule of :func:`tensorcut.compression.plan`: ranks chosen from latencies measured on
this device and thread count (``CompressConfig(target_speedup=X)``).

:func:`plan_speed` (called by the planner with its per-layer builders, as the budget rule is)
times every candidate convolution dense and factorized at a few ranks (with
:func:`tensorcut.timing.measure_latency`, interleaved, on the layer's real input size), keeps only
candidates that are measurably faster than the dense layer, then allocates ranks greedily:
starting from the dense model, it repeatedly takes the layer move with the smallest increase in
kernel error per millisecond saved until the predicted whole-model latency reaches
``dense / target_speedup``. Layers with no faster factorized form stay dense with the reason
``not faster``.

The whole dense model is timed *after* the layers, in one interleaved session with every timed
dense layer (each on its own input); each candidate's latency is its ratio to the dense layer
in the layer's own session times that layer's latency in the joint session. The prediction
(whole model minus the layers' savings) is then in one session's units, so load drift between
sessions, or a slow first measurement, does not skew it (the planner used to time the dense
model alone, first, and on a shared machine that reading came out up to ~50 % high).

:func:`finish_speed_plan` records the target, the dense and predicted
whole-model latencies and how they were measured in ``plan.config["speed"]`` and, with
``verify``, times the compressed whole model against dense (:func:`check_speedup`): when it is
not measurably faster, every layer goes back to dense, so a plan made for speed is never slower
than dense on the machine that made it.

Measured latencies are cached (in memory, and in a JSON file when ``cache`` is a path) keyed by
device, threads, batch, the layer's geometry, method, ranks and input size.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorcut.compression._builder import Builder, decide_one, finalize, make_entry
from tensorcut.compression.config import CompressConfig
from tensorcut.compression.effective import resolve
from tensorcut.compression.plan import LayerPlan, Plan
from tensorcut.compression.rank import RankRule
from tensorcut.errors import TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.layers import get_method
from tensorcut.timing import (
    Comparison,
    LatencyStats,
    compare,
    measure_latency,
    to_memory_format,
)

__all__ = [
    "DEFAULT_SCALES",
    "NOT_FASTER",
    "LatencyCache",
    "SpeedCheck",
    "SpeedOptions",
    "check_speedup",
    "describe_speed",
    "finish_speed_plan",
    "plan_speed",
    "speed_align",
]

#: Candidate ranks per layer: these fractions of the method's reference ranks
#: (``FactorizedConv2d.reference_ranks``: the maximal ranks, CP's MAC-equal rank).
DEFAULT_SCALES = (0.75, 0.5, 0.375, 0.25, 0.125)

NOT_FASTER = "not faster"


@dataclass
class SpeedOptions:
    """How the speed rule measures: ``threads`` torch threads (None: the current setting),
    ``batch``, candidate rank ``scales``, channels-last models, ``warmup`` and ``reps`` rounds per
    measurement, a latency ``cache`` (a JSON path or a :class:`LatencyCache`), ``verify`` (time
    the compressed whole model against dense and fall back to dense when it is not measurably
    faster) and ``progress`` (one line per layer on stderr)."""

    threads: int | None = None
    batch: int = 1
    scales: Sequence[float] = DEFAULT_SCALES
    channels_last: bool = True
    warmup: int = 2
    reps: int = 9
    cache: str | Path | LatencyCache | None = None
    verify: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("batch", "reps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TensorcutError(f"speed option {name} must be an integer >= 1, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise TensorcutError(
                f"speed option warmup must be an integer >= 0, got {self.warmup!r}"
            )
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise TensorcutError(f"speed option threads must be >= 1 or None, got {self.threads!r}")
        if not self.scales or not all(0 < float(s) <= 1 for s in self.scales):
            raise TensorcutError(
                f"speed option scales must be fractions in (0, 1], got {list(self.scales)!r}"
            )


def speed_align(cfg: CompressConfig) -> int:
    """The rank multiple the speed rule uses: ``cfg.align``, or 8 when it is 1 (aligned ranks run
    faster on SIMD units)."""
    return cfg.align if cfg.align > 1 else 8


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
        from tensorcut.checkpoint.io import atomic_write_text

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

    def rescale(self, dense_ms: float) -> None:
        """Express the layer's latencies in another session's units: the dense layer there took
        ``dense_ms``; each candidate keeps its ratio to the dense layer."""
        f = dense_ms / self.dense_ms if self.dense_ms > 0 else 1.0
        self.dense_ms = dense_ms
        for c in self.cands:
            c.ms *= f


class _Bound(nn.Module):
    """A layer applied to its own fixed input (the example it is called with is ignored), so that
    :func:`measure_latency` can time it in one session with the whole model."""

    def __init__(self, layer: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.x = x

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.layer(self.x)


def _time_whole(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[_Layer],
    opts: SpeedOptions,
) -> tuple[LatencyStats, dict[str, float]]:
    """The whole dense ``model`` on ``x`` and each dense layer of ``layers`` on an input of its
    size, in one interleaved session: the model's statistics and each layer's median (ms)."""
    fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
    models: dict[str, nn.Module] = {"model": model}
    for L in layers:
        p = L.conv.weight
        inp = torch.randn(
            opts.batch, L.geom.in_channels, *L.hw, dtype=p.dtype, device=p.device
        ).contiguous(memory_format=fmt)
        conv = to_memory_format(copy.deepcopy(L.conv).eval(), fmt)
        models[f"layer:{L.name}"] = _Bound(conv, inp)
    st = measure_latency(models, x, threads=opts.threads, warmup=opts.warmup, reps=opts.reps)
    return st["model"], {L.name: st[f"layer:{L.name}"].median_ms for L in layers}


def _candidate_ranks(
    method: str, geom: ConvGeometry, hw: tuple[int, int], scales: Sequence[float], align: int
) -> list[tuple[int, ...]]:
    from tensorcut.compression.rank import align_ranks, scaled_ranks

    cls = get_method(method)
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


def _error(conv: nn.Conv2d, method: str, ranks: tuple[int, ...], cache: dict[str, Any]) -> float:
    """Relative kernel error ``||W - W~|| / ||W||`` of ``method`` at ``ranks``.

    The method's cheap bound (:meth:`FactorizedConv2d.error_bound`, e.g. Tucker-2's truncated
    HOSVD tail, computed from spectra kept in ``cache`` per layer) where it has one; otherwise a
    real decomposition, measured.
    """
    cls = get_method(method)
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
    cls = get_method(method)
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


def plan_speed(
    model: nn.Module,
    todo: Sequence[str],
    builders: dict[str, Builder],
    cfg: CompressConfig,
    input_shape: Sequence[int],
    opts: SpeedOptions,
    progress: Iterable[str] | None = None,
) -> tuple[dict[str, LayerPlan], dict[str, nn.Module], dict[str, Any]]:
    """The speed rule over the planner's layers ``todo`` (their builders hold the effective
    convolution and its captured input size): entries, the built layers and the
    ``config["speed"]`` record (see the module docstring). ``progress`` iterates ``todo`` (a
    progress bar)."""
    assert cfg.target_speedup is not None  # the planner's condition
    method = cfg.method
    cls = get_method(method)
    align = speed_align(cfg)
    lc = opts.cache if isinstance(opts.cache, LatencyCache) else LatencyCache(opts.cache)
    p = next(model.parameters())
    x = torch.randn(opts.batch, *input_shape, dtype=p.dtype, device=p.device)
    dense_model = copy.deepcopy(model).eval()
    if opts.channels_last:
        dense_model = to_memory_format(dense_model)
    entries: dict[str, LayerPlan] = {}
    records: list[_Layer] = []
    for i, name in enumerate(progress if progress is not None else todo):
        b = builders[name]
        geom, hw = b.geom, b.hw
        try:
            cls(geom, tuple(1 for _ in cls.max_ranks(geom)))
        except TensorcutError as err:
            entries[name] = make_entry(name, b, hw, method, "dense", f"{method}: {err}")
            continue
        cands = _candidate_ranks(method, geom, hw, opts.scales, align)
        if not cands:
            entries[name] = make_entry(
                name,
                b,
                hw,
                method,
                "dense",
                f"no {method} ranks have fewer MACs than the dense layer",
            )
            continue
        dense_ms, timed = _time_layer(
            b.conv,
            geom,
            hw,
            method,
            cands,
            batch=opts.batch,
            threads=opts.threads,
            warmup=opts.warmup,
            reps=opts.reps,
            channels_last=opts.channels_last,
            cache=lc,
        )
        dense_s = timed.pop(None, None)
        L = _Layer(name, b.conv, geom, hw, dense_ms)
        errors: dict[str, Any] = {}
        for r in cands:
            s = timed[r]
            if _faster(s, dense_s, dense_ms):
                ms = s.median_ms if isinstance(s, LatencyStats) else float(s)
                L.cands.append(_Candidate(r, ms, _error(b.conv, method, r, errors)))
        L.cands.sort(key=lambda c: -c.ms)
        if not L.cands:
            L.reason = NOT_FASTER
        records.append(L)
        if opts.progress:
            print(
                f"[{i + 1}/{len(todo)}] {name}: dense {dense_ms:.3f} ms, "
                f"{len(L.cands)}/{len(cands)} faster forms",
                file=sys.stderr,
                flush=True,
            )
    lc.save()
    # the whole model with every timed layer, in one session (after the layers: a warm process);
    # the layers' latencies then move into this session's units (see the module docstring)
    dense_stats, joint = _time_whole(dense_model, x, records, opts)
    for L in records:
        L.rescale(joint[L.name])
    dense_total = dense_stats.median_ms
    goal = dense_total / cfg.target_speedup
    predicted = _allocate(records, goal, dense_total)
    built: dict[str, nn.Module] = {}
    for L in records:
        b = builders[L.name]
        if L.choice < 0:
            e = make_entry(
                L.name,
                b,
                L.hw,
                method,
                "dense",
                L.reason or "target met without compressing this layer",
            )
            e.latency_ms = {
                "dense": L.dense_ms,
                **({"fastest_factorized": L.cands[-1].ms} if L.cands else {}),
            }
            entries[L.name] = e
            continue
        cand = L.cands[L.choice]
        e, layer = decide_one(L.name, b, L.hw, cfg, RankRule(rank=tuple(cand.ranks)))
        e = finalize(e, b, layer, cfg, L.hw)
        e.latency_ms = {"dense": L.dense_ms, "factorized": cand.ms}
        entries[L.name] = e
        if layer is not None and e.status == "factorize":
            built[L.name] = layer
    record = {
        "target_speedup": cfg.target_speedup,
        "dense_ms": dense_total,
        "predicted_ms": predicted,
        "predicted_speedup": dense_total / predicted if predicted > 0 else math.inf,
        "met": predicted <= goal * (1 + 1e-9),
        "threads": dense_stats.threads,
        "batch": opts.batch,
        "device": dense_stats.device,
        "channels_last": opts.channels_last,
        "dense": dense_stats.describe(),
        "scales": list(opts.scales),
        "align": align,
    }
    return entries, built, record


def finish_speed_plan(
    model: nn.Module, plan: Plan, record: dict[str, Any], opts: SpeedOptions
) -> None:
    """Record ``config["speed"]`` on the finished plan and, with ``opts.verify``, time the
    compressed whole model against dense; when it is not measurably faster every layer goes
    back to dense (reason "whole model not faster when measured")."""
    plan.config["speed"] = record
    plan.config["align"] = record["align"]
    if not (opts.verify and any(e.status == "factorize" for e in plan.layers)):
        return
    check = check_speedup(
        model,
        plan,
        threads=opts.threads,
        batch=opts.batch,
        warmup=opts.warmup,
        reps=opts.reps,
        channels_last=opts.channels_last,
    )
    record.update(
        {
            "measured_ms": check.compressed.median_ms,
            "measured_dense_ms": check.dense.median_ms,
            "measured_speedup": check.speedup,
            "measured": check.describe(),
        }
    )
    if not (check.comparison.measurable and check.comparison.ratio < 1):
        for e in plan.layers:
            if e.status == "factorize":
                e.status, e.reason = "dense", "whole model not faster when measured"
        plan._built = {}
        record["fell_back_to_dense"] = True


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


def _compressed_copy(model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of ``model`` with every ``factorize`` entry of ``plan`` swapped in (the layers the
    plan built, else rebuilt from the module's effective kernel at the recorded ranks)."""
    allow_custom = bool(plan.config.get("allow_custom_forward", False))
    out = copy.deepcopy(model)
    for e in plan.layers:
        if e.status != "factorize":
            continue
        module = model.get_submodule(e.name)
        layer = plan._built.get(e.name)
        if layer is not None and [int(r) for r in getattr(layer, "ranks", ())] == e.ranks:
            layer = copy.deepcopy(layer)
        else:
            r = resolve(module, allow_custom_forward=allow_custom)
            if isinstance(r, str):
                raise TensorcutError(f"plan layer {e.name!r} cannot be factorized here: {r}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer = get_method(e.method).from_conv(r.conv, ranks=tuple(e.ranks), **e.options)
        w = module.weight if isinstance(module.weight, torch.Tensor) else None
        if w is not None:
            layer = layer.to(device=w.device, dtype=w.dtype)
        for n in (e.name, *e.aliases):
            out.set_submodule(n, layer)
    return out


def check_speedup(
    model: nn.Module,
    plan: Plan,
    *,
    threads: int | None = None,
    batch: int = 1,
    warmup: int = 2,
    reps: int = 9,
    channels_last: bool = True,
) -> SpeedCheck:
    """Apply ``plan`` to a copy of ``model``; time dense vs compressed whole models, interleaved."""
    dense = copy.deepcopy(model).eval()
    comp = _compressed_copy(model, plan).eval()
    if channels_last:
        dense = to_memory_format(dense)
        comp = to_memory_format(comp)
    p = next(model.parameters())
    x = torch.randn(batch, *plan.input_shape, dtype=p.dtype, device=p.device)
    st = measure_latency(
        {"dense": dense, "compressed": comp}, x, threads=threads, warmup=warmup, reps=reps
    )
    return SpeedCheck(st["dense"], st["compressed"], compare(st["compressed"], st["dense"]))
