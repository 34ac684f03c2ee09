"""End-to-end latency of compressed real architectures: is a factorized model as fast per MAC?

torchvision ResNet-18, ResNet-50, VGG-16, MobileNetV2 and EfficientNet-B0 (random weights: the
timing does not depend on their values) at 224x224. For each, dense vs Tucker-2 / CP / TT at
whole-model MAC ratios of about 0.25 and 0.5, in eager PyTorch (as built, and after
``tensorcut.inference.prepare_for_inference``), ``torch.compile`` where it works on this CPU, and
ONNX Runtime on the exported model. Every group of models is timed together with
:func:`tensorcut.timing.measure_latency` (warm-up, interleaved rounds, median and IQR); each row
gives the MAC ratio, the latency ratio (median of per-round ratios, IQR) and their quotient
(latency ratio / MAC ratio: 1.0 means the compressed model runs its MACs as efficiently as dense).

Ranks: one MAC fraction ``f`` for every eligible convolution (Conv2d with more than 3 input
channels and groups == 1, as tensorcut's default filter; depthwise stays dense), each layer taking
the largest ranks (rounded to a multiple of ``--align``) whose MACs are at most ``f`` times its
dense MACs, ``f`` chosen (bisection, and a grid: aligned ranks make the total non-monotone in
``f``) so the whole model's conv+linear MACs come closest to the target from below. The factors are
randomly initialised: decomposing the kernels (what ``tensorcut compress`` does) gives the same
layer shapes, and on this shared machine decomposing ResNet-50 three ways took longer than the
timing.

Run (2 shared cores: the default configuration is reduced, see ``REDUCTIONS``)::

    nice -n 10 .venv/bin/python benchmarks/bench_e2e_latency.py
    .venv/bin/python benchmarks/bench_e2e_latency.py --quick     # ResNet-18 only, few reps (smoke)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    LoadMonitor,
    command_line,
    machine_info,
    md_table,
    uptime_line,
    write_json,
    write_markdown,
)  # noqa: E402

from tensorcut.geometry import ConvGeometry
from tensorcut.layers.base import LAYER_REGISTRY  # noqa: E402
from tensorcut.timing import compare, measure_latency  # noqa: E402

OUT = RESULTS / "e2e_latency"
INPUT = (3, 224, 224)
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "vgg16")
METHODS = ("tucker2", "cp", "tt")
TARGETS = (0.25, 0.5)
GRID = 200  # fractions scanned beside the bisection in compressed_copy

REDUCTIONS = [
    "2 CPU cores shared with ~6 other engineers' jobs (load average recorded); run under nice",
    "batch 32 only for ResNet-18 and ResNet-50, and only Tucker-2 at 0.25x MACs there",
    "2 threads only for ResNet-18 and ResNet-50 at batch 1, Tucker-2 at 0.25x MACs only",
    "at batch 32 and at 2 threads only eager+prepared and ONNX Runtime (not the unprepared eager "
    "models)",
    "torch.compile not timed by default (--compile: ResNet-18, batch 1, 1 thread): in the first "
    "run its inductor compilation of ResNet-18 had not finished after 18 minutes under nice 19 on "
    "this machine",
    "repetitions: batch 1: 2 warm-up + 9 timed rounds (VGG-16: 1 + 5); batch 32: 1 warm-up + 4 "
    "timed rounds",
    "a wall-time limit (--limit-min): groups not started by then are listed as skipped",
    "ranks from a uniform per-layer MAC fraction with random factors (not tensorcut's error-driven "
    "budget allocation)",
]


# ----------------------------------------------------------------------------- torchvision


def import_torchvision() -> Any:
    """Import torchvision beside a CPU-only torch wheel whose torchvision C++ extension does not
    load.

    The model definitions only need the ``torchvision::`` operator *schemas* (detection ops such
    as NMS, never run here); the real-architecture tests' helper defines them (one copy of that
    list).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "real_networks"))
    from _torchvision_ops import ensure_torchvision_ops

    ensure_torchvision_ops()
    return importlib.import_module("torchvision")


# ----------------------------------------------------------------------------- models


def conv_inputs(model: nn.Module, shape: tuple[int, ...]) -> tuple[dict[str, tuple[int, int]], int]:
    """Input spatial size of every Conv2d, and the model's conv + linear MACs per image."""
    sizes: dict[str, tuple[int, int]] = {}
    macs = [0]
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):

            def hook(mod: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
                sizes[name] = (inp[0].shape[-2], inp[0].shape[-1])
                macs[0] += ConvGeometry.from_conv(mod).dense_macs(sizes[name])  # type: ignore[arg-type]

            hooks.append(m.register_forward_hook(hook))
        elif isinstance(m, nn.Linear):
            hooks.append(
                m.register_forward_hook(
                    lambda mod, inp, out: macs.__setitem__(
                        0, macs[0] + mod.in_features * mod.out_features
                    )
                )
            )
    with torch.no_grad():
        model(torch.zeros(1, *shape, dtype=next(model.parameters()).dtype))
    for h in hooks:
        h.remove()
    return sizes, macs[0]


def eligible(conv: nn.Module) -> bool:
    """What tensorcut's default filter and every method accept: >3 input channels, groups 1."""
    return type(conv) is nn.Conv2d and conv.in_channels > 3 and conv.groups == 1


def _ranks_at(method: str, geom: ConvGeometry, t: float, align: int) -> tuple[int, ...]:
    """Ranks at scale ``t`` in (0, 1] of the method's reference ranks, rounded up to ``align``."""
    cls = LAYER_REGISTRY[method]
    mx = tuple(cls.max_ranks(geom))
    o, i = geom.out_channels, geom.in_channels
    kh, kw = geom.kernel_size
    ref = {
        "tucker2": (o, i),
        "cp": (max(1, o * i * kh * kw // (o + i + kh + kw)),),
        "tt": (i, min(i * kh, o * kw), o),
    }[method]
    out = []
    for r, m in zip(ref, mx, strict=True):
        v = max(1, math.ceil(t * r))
        v = min(m, math.ceil(v / align) * align)
        out.append(v)
    return tuple(out)


def layer_ranks(
    method: str, geom: ConvGeometry, hw: tuple[int, int], frac: float, align: int
) -> tuple[int, ...] | None:
    """Largest ranks (bisecting the scale) whose MACs are <= ``frac`` x dense; None if none are."""
    cls = LAYER_REGISTRY[method]
    budget = frac * geom.dense_macs(hw)
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(30):
        mid = (lo + hi) / 2
        r = _ranks_at(method, geom, mid, align)
        if cls.predicted_macs(geom, r, hw) <= budget:
            best, lo = r, mid
        else:
            hi = mid
    return best


def compressed_copy(
    model: nn.Module, method: str, target: float, align: int
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model``, eligible convs factorized (random factors) to hit ``target`` x MACs."""
    sizes, dense = conv_inputs(model, INPUT)
    convs = {n: m for n, m in model.named_modules() if n in sizes and eligible(m)}
    geoms = {n: ConvGeometry.from_conv(m) for n, m in convs.items()}
    cls = LAYER_REGISTRY[method]

    def plan(frac: float) -> tuple[dict[str, tuple[int, ...]], int]:
        chosen, total = {}, dense
        for n, g in geoms.items():
            r = layer_ranks(method, g, sizes[n], frac, align)
            if r is None:
                continue
            chosen[n] = r
            total += cls.predicted_macs(g, r, sizes[n]) - g.dense_macs(sizes[n])
        return chosen, total

    lo, hi = 0.0, 1.0
    best = plan(0.0)
    for _ in range(25):
        mid = (lo + hi) / 2
        ch, tot = plan(mid)
        if tot <= target * dense:
            best, lo = (ch, tot), mid
        else:
            hi = mid
    # with aligned ranks the total is not monotone in the fraction (a layer whose smallest aligned
    # ranks exceed the fraction stays dense), so bisection can stop far below the target (ResNet-50
    # at --align 16: 0.117 for 0.25): also scan a grid, keep the largest total within the target
    for k in range(1, GRID + 1):
        ch, tot = plan(k / GRID)
        if best[1] < tot <= target * dense or best[1] > target * dense >= tot:
            best = (ch, tot)
    chosen, total = best
    note = ""
    if (
        total > target * dense
    ):  # unreachable (e.g. most MACs in depthwise convs): the smallest ranks everywhere
        chosen, total = {}, dense
        for n, g in geoms.items():
            r = _ranks_at(method, g, 0.0, align)
            if cls.predicted_macs(g, r, sizes[n]) < g.dense_macs(sizes[n]):
                chosen[n] = r
                total += cls.predicted_macs(g, r, sizes[n]) - g.dense_macs(sizes[n])
        note = (
            f"target {target} unreachable: smallest ranks (multiples of {align}) in every eligible "
            "layer"
        )
    out = copy.deepcopy(model)
    for n, r in chosen.items():
        layer = cls(geoms[n], r, dtype=next(model.parameters()).dtype)
        layer.reset_parameters()
        out.set_submodule(n, layer)
    info = {
        "mac_ratio": total / dense,
        "dense_macs": dense,
        "macs": total,
        "factorized_layers": len(chosen),
        "note": note,
        "eligible_layers": len(geoms),
        "ranks": {n: list(r) for n, r in chosen.items()},
    }
    return out.eval(), info


def build_model(tv: Any, name: str) -> nn.Module:
    torch.manual_seed(0)
    m = getattr(tv.models, name)(weights=None).eval()
    for mod in m.modules():  # non-trivial BatchNorm statistics, so folding is not a no-op
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_var.uniform_(0.5, 2.0)
            mod.running_mean.normal_(0, 0.1)
    return m


# ----------------------------------------------------------------------------- runtimes


def prepared(m: nn.Module, **kw: Any) -> nn.Module:
    from tensorcut.inference import prepare_for_inference

    return prepare_for_inference(m, **kw)


def ort_runner(
    model: nn.Module, threads: int, tmp: Path, tag: str
) -> Callable[[torch.Tensor], Any]:
    """An ONNX Runtime session on the exported ``prepare_for_inference(pointwise='conv')`` model."""
    import onnxruntime as ort

    from tensorcut.export import export_model

    path = tmp / f"{tag}.onnx"
    m = prepared(model, pointwise="conv")
    export_model(m, INPUT, "onnx", path, check=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry(
        "session.intra_op.allow_spinning", "0"
    )  # shared machine: no busy-waiting
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = torch.randn(2, *INPUT)
    with torch.no_grad():
        ref = m(x)
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    err = float((got - ref).norm() / ref.norm())
    if not err < 1e-3:
        raise RuntimeError(f"ONNX Runtime output differs from PyTorch by {err:.2e} (relative)")
    path.unlink()
    return lambda t: sess.run(None, {"input": t.numpy()})


# ----------------------------------------------------------------------------- one group


def time_group(
    result: dict[str, Any],
    *,
    model_name: str,
    runtime: str,
    batch: int,
    threads: int,
    models: dict[str, Callable[[torch.Tensor], Any]],
    infos: dict[str, dict[str, Any]],
    warmup: int,
    reps: int,
) -> None:
    """Time ``models`` (first is dense) interleaved and append one row per compressed variant."""
    torch.manual_seed(1)
    x = torch.randn(batch, *INPUT)
    t0 = time.perf_counter()
    st = measure_latency(models, x, threads=threads, warmup=warmup, reps=reps)
    dense = st["dense"]
    for name, s in st.items():
        if name == "dense":
            continue
        c = compare(s, dense)
        mac = infos[name]["mac_ratio"]
        method, target = name.rsplit("@", 1)
        result["rows"].append(
            {
                "model": model_name,
                "runtime": runtime,
                "batch": batch,
                "threads": threads,
                "method": method,
                "target": float(target),
                "mac_ratio": mac,
                "latency_ratio": c.ratio,
                "ratio_q1": c.low,
                "ratio_q3": c.high,
                "quotient": c.ratio / mac,
                "measurable": c.measurable,
                "dense": dense.to_dict(),
                "compressed": s.to_dict(),
                "describe": c.describe(),
            }
        )
    result["groups"].append(
        {
            "model": model_name,
            "runtime": runtime,
            "batch": batch,
            "threads": threads,
            "seconds": round(time.perf_counter() - t0, 1),
            "dense": dense.describe(),
            "load1": os.getloadavg()[0],
        }
    )
    print(
        f"{model_name:16s} {runtime:16s} b{batch:<3d} t{threads}  dense {dense.describe()}  "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    for r in result["rows"][-(len(models) - 1) :]:
        print(
            f"    {r['method']:8s}@{r['target']:<4} MAC {r['mac_ratio']:.3f}  latency "
            f"{r['latency_ratio']:.3f} (IQR {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f})  quotient "
            f"{r['quotient']:.2f}",
            flush=True,
        )


def skip(result: dict[str, Any], what: str, err: BaseException) -> None:
    msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    result["skipped"].append({"what": what, "reason": msg})
    print(f"SKIP {what}: {msg}", flush=True)


# ----------------------------------------------------------------------------- profile


def profile_top(model: nn.Module, x: torch.Tensor, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` operators with the most self CPU time over 5 calls (torch.profiler, 1 thread)."""
    from torch.profiler import ProfilerActivity, profile

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(2):
                model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    model(x)
    finally:
        torch.set_num_threads(before)
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev) or 1
    return [
        {
            "op": e.key,
            "calls_per_run": e.count // 5,
            "self_ms_per_run": e.self_cpu_time_total / 5e3,
            "share": e.self_cpu_time_total / total,
        }
        for e in ev[:n]
    ]


# ----------------------------------------------------------------------------- speed plans


def speed_plan(
    result: dict[str, Any], name: str, dense: nn.Module, tmp: Path, args: argparse.Namespace
) -> None:
    """Predicted vs measured speed-up of ``plan_for_speedup`` per target (1 thread, batch 1)."""
    from tensorcut.compression.speed import plan_for_speedup

    for target in args.speed_targets:
        t0 = time.perf_counter()
        try:
            p = plan_for_speedup(
                copy.deepcopy(dense),
                target,
                INPUT,
                "tucker2",
                threads=1,
                batch=1,
                verify=True,
                cache=tmp / "latency_cache.json",
                reps=args.reps,
                decompose_options={"hooi": False},
            )  # random weights: HOSVD suffices for timing
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            traceback.print_exc()
            skip(result, f"{name} speed plan x{target}", e)
            continue
        sp = p.config["speed"]
        t = p.totals()
        row = {
            "model": name,
            "target_speedup": target,
            "dense_ms": sp["dense_ms"],
            "predicted_ms": sp["predicted_ms"],
            "predicted_speedup": sp["predicted_speedup"],
            "met": sp["met"],
            "measured_speedup": sp.get("measured_speedup"),
            "measured": sp.get("measured", "no layer factorized"),
            "fell_back_to_dense": bool(sp.get("fell_back_to_dense", False)),
            "mac_ratio": 1.0 / t["model_mac_ratio"],
            "factorized_layers": t["factorized_layers"],
            "not_faster_layers": sum(e.reason == "not faster" for e in p.layers),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        result["speed_plans"].append(row)
        print(
            f"{name} speed plan x{target}: predicted x{row['predicted_speedup']:.2f}, measured "
            f"x{row['measured_speedup'] or 1.0:.2f}, MAC ratio {row['mac_ratio']:.3f}, "
            f"{row['factorized_layers']} factorized, {row['not_faster_layers']} not faster "
            f"({row['seconds']} s)",
            flush=True,
        )


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    tv = import_torchvision()
    machine = machine_info(1)
    machine["threads"] = "1 or 2 (see each row)"
    result: dict[str, Any] = {
        "command": command_line(),
        "machine": machine,
        "reductions": REDUCTIONS,
        "align": args.align,
        "rows": [],
        "groups": [],
        "skipped": [],
        "profiles": {},
        "speed_plans": [],
        "models": {},
    }
    if args.quick:
        result["reductions"] = REDUCTIONS + ["--quick: smoke run, ResNet-18 only, 3 timed rounds"]
    if not args.two_threads:
        result["reductions"] = result["reductions"] + ["--no-two-threads: no 2-thread rows"]
    if args.runtimes:
        result["reductions"] = result["reductions"] + [
            "--runtimes: only " + ", ".join(args.runtimes)
        ]
    out = Path(args.out)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="e2e_latency_"))
    with LoadMonitor() as load:
        for name in args.models:
            try:
                dense = build_model(tv, name)
            except Exception as e:  # noqa: BLE001 - a model that does not build is reported, not fatal
                skip(result, name, e)
                continue
            variants: dict[str, nn.Module] = {}
            infos: dict[str, dict[str, Any]] = {}
            for method in args.methods:
                for target in args.targets:
                    key = f"{method}@{target}"
                    t = time.perf_counter()
                    try:
                        variants[key], infos[key] = compressed_copy(
                            dense, method, target, args.align
                        )
                    except Exception as e:  # noqa: BLE001
                        skip(result, f"{name} {key}", e)
                        continue
                    print(
                        f"{name} {key}: MAC ratio {infos[key]['mac_ratio']:.3f}, "
                        f"{infos[key]['factorized_layers']}/{infos[key]['eligible_layers']} layers "
                        f"({time.perf_counter() - t:.1f} s)",
                        flush=True,
                    )
            result["models"][name] = {
                k: {kk: v for kk, v in i.items() if kk != "ranks"} for k, i in infos.items()
            }
            big = name in ("resnet18", "resnet50")
            heavy = name == "vgg16"
            w1, r1 = (1, 5) if heavy else (2, args.reps)
            configs = [(1, 1, list(variants))]
            if big and not args.quick:
                t2 = [k for k in variants if k == "tucker2@0.25"]
                configs += [(32, 1, t2)] + ([(1, 2, t2)] if args.two_threads else [])
            for batch, threads, keys in configs:
                if not keys:
                    continue
                warm, reps = (1, args.reps_b32) if batch > 1 else (w1, r1)
                sel = {k: variants[k] for k in keys}
                runtimes = (
                    ["eager", "eager+prepared", "onnxruntime"]
                    if (batch, threads) == (1, 1)
                    else ["eager+prepared", "onnxruntime"]
                )
                if name == "resnet18" and batch == 1 and threads == 1 and args.compile:
                    runtimes.append("compile")
                runtimes = [r for r in runtimes if args.runtimes is None or r in args.runtimes]
                for rt in runtimes:
                    if time.perf_counter() - t_start > 60 * args.limit_min:
                        skip(
                            result,
                            f"{name} {rt} batch {batch} threads {threads}",
                            TimeoutError(f"not started: past the {args.limit_min:g}-minute limit"),
                        )
                        continue
                    try:
                        if rt == "eager":
                            fns = {"dense": dense, **sel}
                        elif rt == "eager+prepared":
                            fns = {
                                "dense": prepared(dense),
                                **{k: prepared(m) for k, m in sel.items()},
                            }
                        elif rt == "onnxruntime":
                            fns = {"dense": ort_runner(dense, threads, tmp, f"{name}_dense")}
                            fns.update(
                                {
                                    k: ort_runner(m, threads, tmp, f"{name}_{k}")
                                    for k, m in sel.items()
                                }
                            )
                        else:
                            t2k = [k for k in sel if k.startswith("tucker2@")]
                            fns = {"dense": torch.compile(prepared(dense))}
                            fns.update({k: torch.compile(prepared(sel[k])) for k in t2k})
                            with torch.inference_mode():
                                for f in fns.values():
                                    f(torch.randn(batch, *INPUT))
                        time_group(
                            result,
                            model_name=name,
                            runtime=rt,
                            batch=batch,
                            threads=threads,
                            models=fns,
                            infos=infos,
                            warmup=warm,
                            reps=reps,
                        )
                    except Exception as e:  # noqa: BLE001 - a runtime that fails on this CPU is skipped with its reason
                        traceback.print_exc()
                        skip(result, f"{name} {rt} batch {batch} threads {threads}", e)
                    write_json(out.with_suffix(".json"), result)
            if (
                name in args.speed_plan_models
                and time.perf_counter() - t_start < 60 * args.limit_min
            ):
                speed_plan(result, name, dense, tmp, args)
                write_json(out.with_suffix(".json"), result)
            if args.profile and name in ("resnet18", "resnet50") and "tucker2@0.25" in variants:
                x = torch.randn(1, *INPUT)
                result["profiles"][name] = {
                    "dense (prepared)": profile_top(prepared(dense), x),
                    "tucker2@0.25 (prepared)": profile_top(prepared(variants["tucker2@0.25"]), x),
                }
            write_json(out.with_suffix(".json"), result)
    result["load"] = load.summary()
    result["uptime_at_end"] = uptime_line()
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def render(result: dict[str, Any]) -> str:
    lines = [
        "Latency ratio = compressed / dense latency (median of per-round ratios of interleaved "
        "runs, IQR in brackets); MAC ratio = compressed / dense conv+linear MACs; quotient = "
        "latency ratio / MAC ratio (1.0: the compressed model runs its MACs as efficiently as "
        "dense; the goal is <= 1.15). 'eager' compares the models as built, 'eager+prepared' both "
        "after `prepare_for_inference` (BatchNorm folded), 'onnxruntime' both exported after "
        "`prepare_for_inference(pointwise='conv')`.",
        "",
        "Reductions (2 shared cores, ~30 min budget):",
        "",
    ]
    lines += [f"- {r}" for r in result["reductions"]]
    lines += ["", f"Ranks rounded up to multiples of {result['align']}.", ""]
    head = (
        "model",
        "runtime",
        "batch",
        "threads",
        "method",
        "target",
        "MAC ratio",
        "latency ratio (IQR)",
        "quotient",
        "dense latency",
    )
    rows = []
    for r in result["rows"]:
        d = r["dense"]
        rows.append(
            (
                r["model"],
                r["runtime"],
                r["batch"],
                r["threads"],
                r["method"],
                r["target"],
                f"{r['mac_ratio']:.3f}",
                f"{r['latency_ratio']:.3f} ({r['ratio_q1']:.3f}–{r['ratio_q3']:.3f})"
                + ("" if r["measurable"] else " n.m.d."),
                f"{r['quotient']:.2f}",
                f"{d['median_ms']:.1f} ms (IQR {d['q1_ms']:.1f}–{d['q3_ms']:.1f}), {d['reps']} "
                "reps",
            )
        )
    lines += [
        md_table(head, rows),
        "",
        "n.m.d. = no measurable difference from dense (the ratio's IQR contains 1).",
        "",
    ]
    if result["skipped"]:
        lines += (
            ["Skipped:", ""] + [f"- {s['what']}: {s['reason']}" for s in result["skipped"]] + [""]
        )
    if result.get("speed_plans"):
        lines += [
            "Plans made for speed (`tensorcut.compression.speed.plan_for_speedup`, Tucker-2, 1 "
            "thread, batch "
            "1, eager, channels-last; `verify=True`: measured on the whole model, all-dense if not "
            "measurably faster):",
            "",
        ]
        lines.append(
            md_table(
                (
                    "model",
                    "target",
                    "predicted speed-up",
                    "measured speed-up",
                    "MAC ratio",
                    "factorized",
                    "not faster",
                    "fell back to dense",
                    "measured",
                ),
                [
                    (
                        r["model"],
                        f"x{r['target_speedup']}",
                        f"x{r['predicted_speedup']:.2f}",
                        "-" if r["measured_speedup"] is None else f"x{r['measured_speedup']:.2f}",
                        f"{r['mac_ratio']:.3f}",
                        r["factorized_layers"],
                        r["not_faster_layers"],
                        "yes" if r["fell_back_to_dense"] else "no",
                        r["measured"].replace("\n", "; "),
                    )
                    for r in result["speed_plans"]
                ],
            )
        )
        lines.append("")
    for model, profs in result.get("profiles", {}).items():
        lines += [
            f"Profile, {model}, batch 1, 1 thread (torch.profiler, self CPU time per forward):",
            "",
        ]
        for tag, top in profs.items():
            lines += [
                f"{tag}:",
                "",
                md_table(
                    ("op", "calls", "self ms", "share"),
                    [
                        (
                            t["op"],
                            t["calls_per_run"],
                            f"{t['self_ms_per_run']:.2f}",
                            f"{100 * t['share']:.0f}%",
                        )
                        for t in top
                    ],
                ),
                "",
            ]
    lines.append(
        f"Wall time {result['total_seconds']} s; `uptime` at end: `{result['uptime_at_end']}`."
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 5.5))
    marks = {"eager": "o", "eager+prepared": "s", "onnxruntime": "^", "compile": "D"}
    colors = {"tucker2": "C0", "cp": "C1", "tt": "C2"}
    for r in result["rows"]:
        ax.errorbar(
            r["mac_ratio"],
            r["latency_ratio"],
            yerr=[[r["latency_ratio"] - r["ratio_q1"]], [r["ratio_q3"] - r["latency_ratio"]]],
            fmt=marks.get(r["runtime"], "x"),
            color=colors.get(r["method"], "k"),
            ms=5,
            alpha=0.75,
        )
    xs = [0, 0.7]
    ax.plot(xs, xs, "k-", lw=0.8, label="latency ratio = MAC ratio")
    ax.plot(xs, [1.15 * v for v in xs], "k--", lw=0.8, label="1.15 x MAC ratio (goal)")
    ax.axhline(1.0, color="grey", lw=0.6)
    for rt, mk in marks.items():
        ax.plot([], [], mk, color="grey", label=rt)
    for m, c in colors.items():
        ax.plot([], [], "o", color=c, label=m)
    ax.set_xlabel("MAC ratio (compressed / dense)")
    ax.set_ylabel("latency ratio (compressed / dense), IQR bars")
    ax.set_title("End-to-end latency vs MACs, 224x224, CPU")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    ap.add_argument("--reps", type=int, default=9, help="timed rounds at batch 1")
    ap.add_argument("--reps-b32", type=int, default=4, help="timed rounds at batch 32")
    ap.add_argument(
        "--limit-min", type=float, default=45.0, help="start no new group after this many minutes"
    )
    ap.add_argument("--align", type=int, default=8, help="round ranks up to a multiple of this")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile (ResNet-18, batch 1, 1 thread)",
    )
    ap.add_argument(
        "--speed-plan-models",
        nargs="*",
        default=["resnet18"],
        help="models to make speed plans for",
    )
    ap.add_argument("--speed-targets", nargs="*", type=float, default=[1.5, 3.0])
    ap.add_argument(
        "--runtimes",
        nargs="+",
        choices=("eager", "eager+prepared", "onnxruntime", "compile"),
        help="time only these runtimes (default: all that apply)",
    )
    ap.add_argument(
        "--no-two-threads",
        dest="two_threads",
        action="store_false",
        help="skip the 2-thread rows (ResNet-18/50, batch 1)",
    )
    ap.add_argument(
        "--no-profile", dest="profile", action="store_false", help="skip the operator profiles"
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: ResNet-18, 3 rounds, batch 1, 1 thread"
    )
    ap.add_argument("--out", default=str(OUT), help="results path without suffix")
    args = ap.parse_args()
    if args.quick:
        args.models, args.reps = ["resnet18"], 3
    warnings.simplefilter("ignore")
    result = run(args)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    write_markdown(
        out.with_suffix(".md"),
        "End-to-end latency: compressed vs dense real architectures",
        result["command"],
        render(result),
        result["machine"],
        result["load"],
    )
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}.json, .md, .png in {result['total_seconds']} s")


if __name__ == "__main__":
    main()
