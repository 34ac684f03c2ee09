"""Where does a factorized ResNet spend its time per MAC? (issue 15, "Faster for real")

torchvision ResNet-18 and ResNet-50 (random weights, 224x224), dense vs Tucker-2 at 0.25x the
conv+linear MACs, built as ``bench_e2e_latency.py`` builds them (uniform per-layer MAC fraction,
ranks rounded up to ``--align``, random factors), both after
``tensorcut.inference.prepare_for_inference`` (BatchNorm folded, factorized 1x1 layers merged,
1x1 factors as GEMMs, channels-last), 1 torch thread, batch 1 and batch 32.

For each model and batch:

* the un-profiled latency of both, interleaved (:func:`tensorcut.timing.measure_latency`), and
  the quotient latency ratio / MAC ratio;
* a ``torch.profiler`` run of each in which every leaf module (each convolution, ReLU, pooling,
  linear) and every factorized container runs inside a ``record_function`` label; each ATen op's
  self CPU time goes to the innermost label around it (time outside any label: the residual adds
  and the blocks' Python). The groups: the stem, dense 3x3 convolutions, dense 1x1
  convolutions, the factorized layers' spatial cores, their 1x1 factors, the merged chains of
  factorized 1x1 layers (``PointwiseChain``), the factorized layers' own Python ("glue"), the
  classifier, ReLU, pooling, and the rest;
* per group: MACs executed, time, achieved GMAC/s (GFLOP/s = 2 x GMAC/s), and its part of the
  *excess*: the compressed model's time above ``rho x dense time`` (``rho`` = executed MAC
  ratio, the time at which the compressed model would run its MACs exactly as efficiently as
  dense). A conv group's excess is its time minus its MACs at the dense model's conv GMAC/s; a
  non-conv group's is its time minus ``rho`` x its dense time; the excesses add up to the whole;
* the *floor*: the quotient the compressed model would reach with perfectly efficient convolutions
  (each at the dense model's conv GMAC/s) if the non-conv ops kept their dense time.

Writes ``results/e2e_profile.{json,md}``. Run (1 thread; the shared machine's load is recorded)::

    nice -n -10 .venv/bin/python benchmarks/profile_e2e.py
    .venv/bin/python benchmarks/profile_e2e.py --models resnet18 --batches 1 --quick   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e_latency import build_model, compressed_copy, import_torchvision  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    LoadMonitor,
    command_line,
    machine_info,
    md_table,
    uptime_line,
    write_json,
    write_markdown,
)

from tensorcut.inference import PointwiseChain, prepare_for_inference  # noqa: E402
from tensorcut.layers.base import FactorizedConv2d  # noqa: E402
from tensorcut.timing import compare, measure_latency  # noqa: E402

OUT = RESULTS / "e2e_profile"
INPUT = (3, 224, 224)

#: group -> whether it is convolution/linear work (MACs) or not
GROUPS: dict[str, bool] = {
    "stem conv 7x7": True,
    "dense 3x3 conv": True,
    "dense 1x1 conv": True,
    "factorized 3x3 core": True,
    "factorized 1x1 factors": True,
    "merged 1x1 chain": True,
    "fc": True,
    "factorized glue": False,
    "ReLU": False,
    "pooling": False,
    "residual add & other": False,
}
CONV_GROUPS = [g for g, c in GROUPS.items() if c]
OTHER_GROUPS = [g for g, c in GROUPS.items() if not c]


# ----------------------------------------------------------------------------- grouping


def classify(model: nn.Module) -> dict[str, str]:
    """Module name -> group, for every module that gets a profiler label."""
    mods = dict(model.named_modules())

    def owner(name: str) -> nn.Module | None:
        """The nearest factorized (or merged-chain) module above ``name``."""
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            m = mods[".".join(parts[:i])]
            if isinstance(m, (FactorizedConv2d, PointwiseChain)):
                return m
        return None

    out: dict[str, str] = {}
    for name, m in model.named_modules():
        parent = owner(name) if name else None
        if isinstance(m, (FactorizedConv2d, PointwiseChain)):
            out[name] = "factorized glue"
        elif isinstance(m, nn.Conv2d):
            k = tuple(m.kernel_size)
            if isinstance(parent, PointwiseChain):
                out[name] = "merged 1x1 chain"
            elif isinstance(parent, FactorizedConv2d):
                out[name] = "factorized 1x1 factors" if k == (1, 1) else "factorized 3x3 core"
            elif m.in_channels == 3:
                out[name] = "stem conv 7x7"
            else:
                out[name] = "dense 1x1 conv" if k == (1, 1) else "dense 3x3 conv"
        elif isinstance(m, nn.Linear):
            out[name] = "fc"
        elif isinstance(m, nn.ReLU):
            out[name] = "ReLU"
        elif isinstance(m, (nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
            out[name] = "pooling"
    return out


def conv_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """MACs each Conv2d / Linear module executes on ``x`` (batch included), by module name."""
    macs: dict[str, int] = defaultdict(int)
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):

            def hook(mod: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
                assert isinstance(mod, nn.Conv2d)
                kh, kw = mod.kernel_size
                macs[name] += out.numel() * (mod.in_channels // mod.groups) * kh * kw

            hooks.append(m.register_forward_hook(hook))
        elif isinstance(m, nn.Linear):

            def lhook(mod: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
                assert isinstance(mod, nn.Linear)
                macs[name] += out.numel() * mod.in_features

            hooks.append(m.register_forward_hook(lhook))
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return dict(macs)


def shapes(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Input/output channel and spatial sizes of each Conv2d, by module name (first call)."""
    info: dict[str, dict[str, Any]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):

            def hook(mod: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
                assert isinstance(mod, nn.Conv2d)
                info.setdefault(
                    name,
                    {
                        "in": mod.in_channels,
                        "out": mod.out_channels,
                        "k": list(mod.kernel_size),
                        "stride": list(mod.stride),
                        "hw_in": list(inp[0].shape[-2:]),
                        "hw_out": list(out.shape[-2:]),
                        "type": type(mod).__name__,
                    },
                )

            hooks.append(m.register_forward_hook(hook))
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return info


@contextmanager
def labelled(model: nn.Module, groups: dict[str, str]) -> Iterator[None]:
    """Run every grouped module inside a ``record_function('tc|group|name')`` label."""
    from torch.autograd.profiler import record_function

    stack: list[Any] = []
    hooks = []
    for name, m in model.named_modules():
        if name not in groups:
            continue

        def pre(mod: nn.Module, inp: Any, label: str = f"tc|{groups[name]}|{name}") -> None:
            rf = record_function(label)
            rf.__enter__()
            stack.append(rf)

        def post(mod: nn.Module, inp: Any, out: Any) -> None:
            stack.pop().__exit__(None, None, None)

        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def profile_groups(
    model: nn.Module, x: torch.Tensor, groups: dict[str, str], runs: int
) -> dict[str, Any]:
    """ATen op self CPU time per group, per module and per (group, op), in ms per forward.

    The labels' own self time (the module's Python between its ops, plus the label's and hook's
    overhead) is kept apart as ``python_ms``; ``plain_total_ms`` is the total of a second
    profile without labels (ATen events only), to show the profiler's own cost.
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as plain:
            for _ in range(runs):
                model(x)
        with labelled(model, groups):
            model(x)  # warm (labels included)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    model(x)
    aten: dict[str, float] = defaultdict(float)
    python: dict[str, float] = defaultdict(float)
    events: dict[str, int] = defaultdict(int)
    by_module: dict[str, float] = defaultdict(float)
    by_op: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for ev in prof.events():
        label = None
        e = ev
        while e is not None:
            if e.name.startswith("tc|"):
                label = e.name
                break
            e = e.cpu_parent
        us = float(ev.self_cpu_time_total)
        if label is None:
            g, mod = "residual add & other", ""
        else:
            _, g, mod = label.split("|", 2)
        if ev.name.startswith("tc|"):
            python[g] += us
            continue
        aten[g] += us
        events[g] += 1
        if mod:
            by_module[mod] += us
        by_op[g][ev.name] += us
    scale = 1e3 * runs
    return {
        "runs": runs,
        "aten_ms": {g: v / scale for g, v in aten.items()},
        "python_ms": {g: v / scale for g, v in python.items()},
        "aten_events": {g: v // runs for g, v in events.items()},
        "aten_total_ms": sum(aten.values()) / scale,
        "labelled_total_ms": (sum(aten.values()) + sum(python.values())) / scale,
        "plain_total_ms": sum(float(e.self_cpu_time_total) for e in plain.events()) / scale,
        "modules_ms": {m: v / scale for m, v in by_module.items()},
        "ops_ms": {
            g: dict(sorted(((o, v / scale) for o, v in ops.items()), key=lambda t: -t[1]))
            for g, ops in by_op.items()
        },
    }


# ----------------------------------------------------------------------------- analysis

FRAMEWORK = "framework (Python, dispatch)"


def analyse(dense: dict[str, Any], comp: dict[str, Any]) -> dict[str, Any]:
    """Per-group MACs, time, GMAC/s and excess; the executed MAC ratio, quotients and floors.

    The group times are ATen op times from one profile of each model, so the shares and the
    ATen floor are self-consistent. ``framework`` = the un-profiled median latency minus the ATen
    total (Python of the modules and blocks, dispatch: what runs between the kernels); it mixes
    two measurements taken at different moments, so it is noisier (on this shared machine about
    +-2 ms at batch 1, +-10 % at batch 32) and kept out of the shares.
    """
    md, mc = dense["group_macs"], comp["group_macs"]
    td, tc = dense["profile"]["aten_ms"], comp["profile"]["aten_ms"]
    Ad, Ac = dense["profile"]["aten_total_ms"], comp["profile"]["aten_total_ms"]
    Ld, Lc = dense["latency_ms"], comp["latency_ms"]
    Fd, Fc = Ld - Ad, Lc - Ac
    Md, Mc = sum(md.values()), sum(mc.values())
    rho = Mc / Md
    Td_conv = sum(td.get(g, 0.0) for g in CONV_GROUPS)
    Tc_conv = sum(tc.get(g, 0.0) for g in CONV_GROUPS)
    Td_other, Tc_other = Ad - Td_conv, Ac - Tc_conv
    eff_d = Md / Td_conv  # MACs per ms, dense convs + fc
    excess_total = Ac - rho * Ad
    rows = []
    for g in GROUPS:
        x, y = td.get(g, 0.0), tc.get(g, 0.0)
        mx, my = md.get(g, 0), mc.get(g, 0)
        if not (x or y or mx or my):
            continue
        excess = (y - my / eff_d) if GROUPS[g] else (y - rho * x)
        rows.append(
            {
                "group": g,
                "conv": GROUPS[g],
                "dense_gmacs": mx / 1e9,
                "dense_ms": x,
                "dense_gmac_per_s": (mx / x / 1e6) if x and mx else None,
                "comp_gmacs": my / 1e9,
                "comp_ms": y,
                "comp_gmac_per_s": (my / y / 1e6) if y and my else None,
                "excess_ms": excess,
                "excess_share": excess / excess_total if excess_total > 0 else None,
            }
        )
    rows.append(
        {
            "group": FRAMEWORK,
            "conv": False,
            "dense_gmacs": 0.0,
            "dense_ms": Fd,
            "dense_gmac_per_s": None,
            "comp_gmacs": 0.0,
            "comp_ms": Fc,
            "comp_gmac_per_s": None,
            "excess_ms": Fc - rho * Fd,
            "excess_share": None,
        }
    )
    by_kind = {
        "conv inefficiency": sum(r["excess_ms"] for r in rows if r["conv"]),
        "non-conv ops": sum(
            r["excess_ms"] for r in rows if not r["conv"] and r["group"] != FRAMEWORK
        ),
    }
    floor_aten = (Td_other + rho * Td_conv) / Ad
    floor_all = (Td_other + Fd + rho * Td_conv) / Ld
    return {
        "executed_mac_ratio": rho,
        "dense_ms": Ld,
        "comp_ms": Lc,
        "dense_aten_ms": Ad,
        "comp_aten_ms": Ac,
        "aten_quotient": Ac / Ad / rho,
        "latency_quotient": Lc / Ld / rho,
        "dense_conv_ms": Td_conv,
        "comp_conv_ms": Tc_conv,
        "dense_other_ms": Td_other,
        "comp_other_ms": Tc_other,
        "dense_framework_ms": Fd,
        "comp_framework_ms": Fc,
        "dense_conv_gmac_per_s": eff_d / 1e6,
        "comp_conv_gmac_per_s": Mc / Tc_conv / 1e6,
        "ideal_comp_aten_ms": rho * Ad,
        "excess_aten_ms": excess_total,
        "excess_by_kind_ms": by_kind,
        "floor_latency_ratio": floor_aten,
        "floor_quotient": floor_aten / rho,
        "floor_with_framework_quotient": floor_all / rho,
        "rows": rows,
    }


def group_macs(macs: dict[str, int], groups: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for name, v in macs.items():
        out[groups[name]] += v
    return dict(out)


def layer_rows(model: dict[str, Any], limit: int = 12) -> list[dict[str, Any]]:
    """The modules with the most ATen time: shape, MACs, ms and GMAC/s."""
    mods = model["profile"]["modules_ms"]
    out = []
    for name, ms in sorted(mods.items(), key=lambda t: -t[1])[:limit]:
        s = model["shapes"].get(name, {})
        macs = model["macs"].get(name, 0)
        out.append(
            {
                "module": name,
                "group": model["groups"].get(name, ""),
                "shape": (
                    f"{s['in']}->{s['out']} {s['k'][0]}x{s['k'][1]}/{s['stride'][0]} "
                    f"@{s['hw_in'][0]}x{s['hw_in'][1]}"
                    if s
                    else ""
                ),
                "ms": ms,
                "gmacs": macs / 1e9,
                "gmac_per_s": macs / ms / 1e6 if ms and macs else None,
            }
        )
    return out


# ----------------------------------------------------------------------------- main


def keep_freed_memory() -> str:
    """Have glibc malloc keep freed memory (no ``mmap`` for big blocks, no trimming), so a
    forward pass's big activations reuse pages already mapped instead of page-faulting fresh
    ones on every call (PyTorch has no caching allocator on CPU; jemalloc or tcmalloc do the
    same). Process-wide: dense and compressed models alike. Returns what was set."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    ok = (
        libc.mallopt(m_mmap_max, 0)
        and libc.mallopt(m_trim_threshold, 2**31 - 1)
        and libc.mallopt(m_top_pad, 256 << 20)
    )
    return "M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1, M_TOP_PAD=256 MiB" if ok else "mallopt failed"


def autogroup() -> str:
    """This process's scheduler autogroup and its nice value (Linux): with autogroups on, plain
    ``nice`` only ranks processes within one session; the group's own nice ranks the session."""
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return "n/a"


def run(args: argparse.Namespace) -> dict[str, Any]:
    tv = import_torchvision()
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "command": command_line(),
        "machine": machine_info(1),
        "autogroup": autogroup(),
        "align": args.align,
        "target": args.target,
        "pointwise": args.pointwise,
        "cases": [],
    }
    with LoadMonitor() as load:
        for name in args.models:
            dense = build_model(tv, name)
            comp, info = compressed_copy(dense, "tucker2", args.target, args.align)
            models = {
                "dense": prepare_for_inference(dense),
                "tucker2": prepare_for_inference(comp, pointwise=args.pointwise),
            }
            for batch in args.batches:
                torch.manual_seed(1)
                x = torch.randn(batch, *INPUT)
                big = batch > 1
                warm, reps = (1, args.reps_b32) if big else (2, args.reps)
                runs = args.runs_b32 if big else args.runs
                t0 = time.perf_counter()
                st = measure_latency(models, x, threads=1, warmup=warm, reps=reps)
                cmp = compare(st["tucker2"], st["dense"])
                case: dict[str, Any] = {
                    "model": name,
                    "batch": batch,
                    "planned_mac_ratio": info["mac_ratio"],
                    "timing": {
                        "dense": st["dense"].to_dict(),
                        "tucker2": st["tucker2"].to_dict(),
                        "comparison": cmp.to_dict(),
                        "quotient_planned": cmp.ratio / info["mac_ratio"],
                    },
                    "load1_before_profile": os.getloadavg()[0],
                }
                for tag, m in models.items():
                    groups = classify(m)
                    macs = conv_macs(m, x)
                    case[tag] = {
                        "groups": groups,
                        "macs": macs,
                        "group_macs": group_macs(macs, groups),
                        "shapes": shapes(m, x[:1]),
                        "profile": profile_groups(m, x, groups, runs),
                        "latency_ms": st[tag].median_ms,
                    }
                case["analysis"] = analyse(case["dense"], case["tucker2"])
                case["timing"]["quotient_executed"] = (
                    cmp.ratio / case["analysis"]["executed_mac_ratio"]
                )
                case["seconds"] = round(time.perf_counter() - t0, 1)
                case["load1_after"] = os.getloadavg()[0]
                result["cases"].append(case)
                a = case["analysis"]
                print(
                    f"{name} b{batch}: dense {st['dense'].median_ms:.1f} ms, tucker2 "
                    f"{st['tucker2'].median_ms:.1f} ms, ratio {cmp.ratio:.3f}, MAC "
                    f"{info['mac_ratio']:.3f} (executed {a['executed_mac_ratio']:.3f}), quotient "
                    f"{case['timing']['quotient_planned']:.2f} (executed "
                    f"{case['timing']['quotient_executed']:.2f}), floor {a['floor_quotient']:.2f} "
                    f"({case['seconds']} s, load {case['load1_after']:.2f})",
                    flush=True,
                )
                write_json(Path(args.out).with_suffix(".json"), result)
    result["load"] = load.summary()
    result["uptime_at_end"] = uptime_line()
    return result


# ----------------------------------------------------------------------------- variants

VARIANT_NOTES = {
    "a8": "ranks multiples of 8 (the e2e benchmark's default), prepare_for_inference() defaults "
    "(channels-last, 1x1 factors as F.conv2d)",
    "a8 contiguous": "same model, prepared with channels_last=False",
    "a8 pointwise=gemm": "same model, prepared with pointwise='gemm' (1x1 factors as GEMMs on "
    "views; the default before this change)",
    "a16": "ranks multiples of 16, prepared",
    "a32": "ranks multiples of 32 (0.25 is out of reach: the smallest aligned ranks in every "
    "layer), prepared",
}


def run_variants(args: argparse.Namespace) -> dict[str, Any]:
    """Dense vs Tucker-2 variants (rank alignment, memory format, 1x1 path; eager, ONNX Runtime,
    optionally torch.compile), interleaved per runtime, at each batch."""
    import tempfile

    from bench_e2e_latency import ort_runner

    tv = import_torchvision()
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "command": command_line(),
        "machine": machine_info(1),
        "autogroup": autogroup(),
        "target": args.target,
        "notes": VARIANT_NOTES,
        "rows": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="e2e_variants_"))
    with LoadMonitor() as load:
        for name in args.models:
            dense = build_model(tv, name)
            comps: dict[int, tuple[nn.Module, dict[str, Any]]] = {
                a: compressed_copy(dense, "tucker2", args.target, a) for a in (8, 16, 32)
            }
            x1 = torch.randn(1, *INPUT)
            pd = prepare_for_inference(dense)
            dense_macs = sum(conv_macs(pd, x1).values())

            eager: dict[str, nn.Module] = {
                "a8": prepare_for_inference(comps[8][0]),
                "a8 contiguous": prepare_for_inference(comps[8][0], channels_last=False),
                "a8 pointwise=gemm": prepare_for_inference(comps[8][0], pointwise="gemm"),
                "a16": prepare_for_inference(comps[16][0]),
                "a32": prepare_for_inference(comps[32][0]),
            }
            built = {
                k: comps[int(k.split()[0][1:])][1]["mac_ratio"] for k in eager
            }  # MAC ratio of the model as built
            execd = {k: sum(conv_macs(m, x1).values()) / dense_macs for k, m in eager.items()}
            groups: list[tuple[str, dict[str, Any]]] = [("eager", {"dense": pd, **eager})]
            ort = {"dense": ort_runner(dense, 1, tmp, f"{name}_dense")}
            ort.update({f"a{a}": ort_runner(comps[a][0], 1, tmp, f"{name}_a{a}") for a in comps})
            groups.append(("onnxruntime", ort))
            if args.compile and name == "resnet18":
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True
                comp_fns: dict[str, Any] = {}
                for k, m in (("dense", pd), ("a8", eager["a8"])):
                    t0 = time.perf_counter()
                    f = torch.compile(m)
                    with torch.inference_mode():
                        f(x1)
                    result.setdefault("compile_seconds", {})[k] = round(time.perf_counter() - t0, 1)
                    comp_fns[k] = f
                groups.append(("compile (inductor, freezing)", comp_fns))
            for batch in args.batches:
                torch.manual_seed(1)
                x = torch.randn(batch, *INPUT)
                warm, reps = (1, args.reps_b32) if batch > 1 else (2, args.reps)
                for runtime, fns in groups:
                    if runtime.startswith("compile") and batch > 1:
                        continue
                    t0 = time.perf_counter()
                    st = measure_latency(fns, x, threads=1, warmup=warm, reps=reps)
                    for k, s in st.items():
                        if k == "dense":
                            continue
                        c = compare(s, st["dense"])
                        row = {
                            "model": name,
                            "batch": batch,
                            "runtime": runtime,
                            "variant": k,
                            "mac_ratio": built[k],
                            "executed_mac_ratio": execd[k],
                            "latency_ratio": c.ratio,
                            "ratio_q1": c.low,
                            "ratio_q3": c.high,
                            "quotient": c.ratio / built[k],
                            "quotient_executed": c.ratio / execd[k],
                            "dense": st["dense"].to_dict(),
                            "compressed": s.to_dict(),
                            "load1": os.getloadavg()[0],
                        }
                        result["rows"].append(row)
                        print(
                            f"{name} b{batch} {runtime:12s} {k:18s} MAC {built[k]:.3f} "
                            f"(exec {execd[k]:.3f}) ratio {c.ratio:.3f} ({c.low:.3f}-{c.high:.3f})"
                            f" quotient {row['quotient']:.2f} ({row['quotient_executed']:.2f}); "
                            f"dense {st['dense'].median_ms:.1f} ms, load {row['load1']:.2f} "
                            f"({time.perf_counter() - t0:.0f} s)",
                            flush=True,
                        )
                    write_json(Path(args.out).with_suffix(".json"), result)
    result["load"] = load.summary()
    result["uptime_at_end"] = uptime_line()
    return result


def render_variants(result: dict[str, Any]) -> str:
    lines = [
        f"Tucker-2 at {result['target']}x MACs, variants of the same models, each timed "
        "interleaved with the dense model of its runtime (eager: `prepare_for_inference()` "
        "defaults; ONNX Runtime: exported after `prepare_for_inference(pointwise='conv')`, 1 "
        "intra-op thread, ORT_ENABLE_ALL; compile: `torch.compile` of the prepared model, "
        "inductor, freezing on), 1 thread, 224x224. Quotient = latency ratio / MAC ratio as "
        "built (executed MACs after prepare in brackets). glibc malloc: "
        f"{result.get('malloc', 'default')}. Scheduler autogroup: "
        f"`{result.get('autogroup', 'n/a')}`.",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in result["notes"].items()]
    if result.get("compile_seconds"):
        lines += [
            "",
            "torch.compile time (first call, seconds): "
            + ", ".join(f"{k} {v}" for k, v in result["compile_seconds"].items()),
        ]
    lines += [
        "",
        md_table(
            (
                "model",
                "batch",
                "runtime",
                "variant",
                "MAC ratio (executed)",
                "latency ratio (IQR)",
                "quotient (executed)",
                "dense median",
                "reps",
                "load",
            ),
            [
                (
                    r["model"],
                    r["batch"],
                    r["runtime"],
                    r["variant"],
                    f"{r['mac_ratio']:.3f} ({r['executed_mac_ratio']:.3f})",
                    f"{r['latency_ratio']:.3f} ({r['ratio_q1']:.3f}–{r['ratio_q3']:.3f})",
                    f"{r['quotient']:.2f} ({r['quotient_executed']:.2f})",
                    f"{r['dense']['median_ms']:.1f} ms",
                    f"{r['dense']['reps']} after {r['dense']['warmup']}",
                    f"{r['load1']:.2f}",
                )
                for r in result["rows"]
            ],
        ),
        "",
        f"`uptime` at end: `{result['uptime_at_end']}`.",
    ]
    return "\n".join(lines)


def _f(x: float | None, d: int = 2) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def render(result: dict[str, Any]) -> str:
    lines = [
        "Dense vs Tucker-2 at "
        f"{result['target']}x MACs (ranks multiples of {result['align']}, random factors, built "
        "as in `bench_e2e_latency.py`), both after `prepare_for_inference()` (BatchNorm folded, "
        "factorized 1x1 layers merged, channels-last; "
        f"pointwise={result.get('pointwise', 'gemm')!r}), 1 thread, 224x224. "
        f"glibc malloc: {result.get('malloc', 'default')}. Scheduler "
        f"autogroup: `{result.get('autogroup', 'n/a')}`.",
        "",
        "- Latency: interleaved, un-profiled (`measure_latency`); quotient = latency ratio / MAC "
        "ratio.",
        "- Group times: `torch.profiler`, the self CPU time of every ATen op attributed to the "
        "innermost module label around it (ms per forward, in situ). The labels' own time "
        "(Python inside modules plus the labels' and hooks' overhead) is not in them; "
        f"'{FRAMEWORK}' = the un-profiled latency minus all ATen op time: what runs between "
        "the kernels. The ATen times still carry the profiler's per-op cost (compare the "
        "profiled totals with the latency below).",
        "- GMAC/s = executed MACs / ATen time (GFLOP/s = 2 x GMAC/s).",
        "- Excess = the compressed model's ATen time above rho x the dense model's (rho = "
        "executed MAC ratio: the time at which it would run its MACs as efficiently as dense). "
        "A conv group's excess is its time minus its MACs at the dense convs' GMAC/s; a non-conv "
        "group's is its time minus rho x its dense time; they add up to the whole. The framework "
        "row (latency minus ATen time, two measurements at different moments: noisier, about "
        "+-2 ms at batch 1 and +-10 % at batch 32 here) is shown apart.",
        "- Floor = the quotient with every conv at the dense convs' GMAC/s while the non-conv "
        "ops keep their dense time (from the ATen times; in brackets with the framework time "
        "kept as well).",
        "",
    ]
    for c in result["cases"]:
        t, a = c["timing"], c["analysis"]
        d, s = t["dense"], t["tucker2"]
        cm = t["comparison"]
        pd, pc = c["dense"]["profile"], c["tucker2"]["profile"]
        lines += [
            f"## {c['model']}, batch {c['batch']}",
            "",
            f"Latency (interleaved, {d['reps']} reps after {d['warmup']} warm-up): dense median "
            f"{d['median_ms']:.1f} ms (IQR {d['q1_ms']:.1f}–{d['q3_ms']:.1f}), Tucker-2 "
            f"{s['median_ms']:.1f} ms (IQR {s['q1_ms']:.1f}–{s['q3_ms']:.1f}); ratio "
            f"{cm['ratio']:.3f} (IQR {cm['low']:.3f}–{cm['high']:.3f}). MAC ratio as built "
            f"{c['planned_mac_ratio']:.3f}, executed after prepare {a['executed_mac_ratio']:.3f}; "
            f"**quotient {t['quotient_planned']:.2f}** (vs built MACs) / "
            f"{t['quotient_executed']:.2f} (vs executed MACs). Load (1-min) "
            f"{c['load1_before_profile']:.2f} → {c['load1_after']:.2f}.",
            "",
            f"Profiled ({pd['runs']} forwards each): ATen op total dense {pd['aten_total_ms']:.1f} "
            f"ms / Tucker-2 {pc['aten_total_ms']:.1f} ms; all events with labels "
            f"{pd['labelled_total_ms']:.1f} / {pc['labelled_total_ms']:.1f} ms; without labels "
            f"{pd['plain_total_ms']:.1f} / {pc['plain_total_ms']:.1f} ms.",
            "",
            f"Conv+linear GMAC/s: dense {a['dense_conv_gmac_per_s']:.1f}, Tucker-2 "
            f"{a['comp_conv_gmac_per_s']:.1f}. ATen time: dense {a['dense_aten_ms']:.1f} ms "
            f"(non-conv ops {a['dense_other_ms']:.1f} ms, "
            f"{100 * a['dense_other_ms'] / a['dense_aten_ms']:.0f} %), Tucker-2 "
            f"{a['comp_aten_ms']:.1f} ms (non-conv ops {a['comp_other_ms']:.1f} ms, "
            f"{100 * a['comp_other_ms'] / a['comp_aten_ms']:.0f} %); ATen quotient "
            f"{a['aten_quotient']:.2f}. Excess over rho x dense (ATen): "
            f"{a['excess_aten_ms']:.1f} ms = conv inefficiency "
            f"{a['excess_by_kind_ms']['conv inefficiency']:.1f} ms + non-conv ops "
            f"{a['excess_by_kind_ms']['non-conv ops']:.1f} ms; framework (latency - ATen): "
            f"dense {a['dense_framework_ms']:.1f} ms, Tucker-2 {a['comp_framework_ms']:.1f} ms. "
            f"**Floor** (convs at dense GMAC/s, non-conv ops at their dense time): latency ratio "
            f"{a['floor_latency_ratio']:.3f}, quotient {a['floor_quotient']:.2f} (with the "
            f"framework time kept too: {a['floor_with_framework_quotient']:.2f}), vs executed "
            f"MACs; vs the MACs as built: {a['floor_latency_ratio'] / c['planned_mac_ratio']:.2f}.",
            "",
            md_table(
                (
                    "group",
                    "dense GMAC",
                    "dense ms",
                    "dense GMAC/s",
                    "T2 GMAC",
                    "T2 ms",
                    "T2 GMAC/s",
                    "excess ms",
                    "share of excess",
                ),
                [
                    (
                        r["group"],
                        _f(r["dense_gmacs"], 3),
                        _f(r["dense_ms"]),
                        _f(r["dense_gmac_per_s"], 1),
                        _f(r["comp_gmacs"], 3),
                        _f(r["comp_ms"]),
                        _f(r["comp_gmac_per_s"], 1),
                        _f(r["excess_ms"]),
                        "-" if r["excess_share"] is None else f"{100 * r['excess_share']:.0f} %",
                    )
                    for r in a["rows"]
                ],
            ),
            "",
        ]
        for tag in ("dense", "tucker2"):
            ops = c[tag]["profile"]["ops_ms"]
            py = c[tag]["profile"]["python_ms"]
            cells = []
            for g in GROUPS:
                if g not in ops and g not in py:
                    continue
                top = [(o, v) for o, v in list(ops.get(g, {}).items())[:4] if v >= 0.01]
                cells.append(
                    (
                        g,
                        ", ".join(f"{o.replace('aten::', '')} {v:.2f}" for o, v in top),
                        _f(py.get(g)),
                    )
                )
            lines += [
                f"Top ATen ops per group, {tag} (ms per forward):",
                "",
                md_table(("group", "ops", "labels' own time (Python + profiler)"), cells),
                "",
            ]
        lines += [
            "Tucker-2 modules with the most ATen time:",
            "",
            md_table(
                ("module", "group", "shape (in->out k/stride @input)", "ms", "GMAC", "GMAC/s"),
                [
                    (
                        r["module"],
                        r["group"],
                        r["shape"],
                        _f(r["ms"]),
                        _f(r["gmacs"], 4),
                        _f(r["gmac_per_s"], 1),
                    )
                    for r in layer_rows(c["tucker2"])
                ],
            ),
            "",
        ]
    lines.append(f"`uptime` at end: `{result['uptime_at_end']}`.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--target", type=float, default=0.25)
    ap.add_argument("--align", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15, help="timed rounds at batch 1")
    ap.add_argument("--reps-b32", type=int, default=5, help="timed rounds at batch > 1")
    ap.add_argument("--runs", type=int, default=10, help="profiled forwards at batch 1")
    ap.add_argument("--runs-b32", type=int, default=2, help="profiled forwards at batch > 1")
    ap.add_argument(
        "--pointwise", default="conv", choices=("gemm", "conv"), help="Tucker-2 1x1 path"
    )
    ap.add_argument(
        "--malloc-keep",
        action="store_true",
        help="glibc malloc keeps freed memory (no mmap, no trim): no page faults on big buffers",
    )
    ap.add_argument(
        "--variants",
        action="store_true",
        help="time Tucker-2 variants (alignment, layout, 1x1 path, runtimes) instead of profiling",
    )
    ap.add_argument("--compile", action="store_true", help="with --variants: torch.compile R-18 b1")
    ap.add_argument(
        "--render",
        metavar="JSON",
        help="re-render JSON's markdown beside it (analysis recomputed from its raw profile)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 reps, 2 profiled runs")
    ap.add_argument("--out", default=str(OUT), help="results path without suffix")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.reps_b32, args.runs, args.runs_b32 = 3, 2, 2, 1
    warnings.simplefilter("ignore")
    if args.render:
        path = Path(args.render)
        result = json.loads(path.read_text())
        for c in result.get("cases", []):
            c["analysis"] = analyse(c["dense"], c["tucker2"])
        write_json(path, result)
        write_markdown(
            path.with_suffix(".md"),
            "Profile: where a Tucker-2 ResNet spends its time per MAC",
            result["command"],
            render(result),
            result["machine"],
            result["load"],
        )
        print(f"re-rendered {path.with_suffix('.md')}")
        return
    malloc = keep_freed_memory() if args.malloc_keep else "default"
    if args.variants and args.out == str(OUT):
        args.out = str(RESULTS / "e2e_variants")
    t0 = time.perf_counter()
    result = run_variants(args) if args.variants else run(args)
    result["malloc"] = malloc
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    write_markdown(
        out.with_suffix(".md"),
        "Tucker-2 variants: rank alignment, layout, 1x1 path, runtime"
        if args.variants
        else "Profile: where a Tucker-2 ResNet spends its time per MAC",
        result["command"],
        render_variants(result) if args.variants else render(result),
        result["machine"],
        result["load"],
    )
    print(f"wrote {out}.json and .md in {result['total_seconds']} s")


if __name__ == "__main__":
    main()
