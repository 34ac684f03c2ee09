"""CPU forward latency of factorized convolutions vs dense ``nn.Conv2d`` at about 25% of the dense
MACs.

Two layers, batch 32, 3x3 kernels, padding 1, stride 1, no bias:

* 64 -> 64 channels at 32x32, and
* 512 -> 512 channels at 8x8.

Variants: the dense ``nn.Conv2d``; every tensorcut layer class in ``LAYER_REGISTRY`` (CP,
Tucker-2, full Tucker, TT, TR) with ranks picked by the same bisection the planner uses
(uniform scaling of the maximal ranks) so that its closed-form ``predicted_macs`` is at most
``--mac-ratio`` (0.25) of the dense MACs; Tucker-2 and TT again with ranks aligned to
multiples of 16 (the planner's ``align=16``, same MAC cap); and, when tensorly-torch is installed,
its ``FactorizedConv`` (``implementation='factorized'``) at the *same* ranks for CP, Tucker (spatial
ranks full, i.e. Tucker-2) and TT. The MACs actually executed are counted for every variant with
``torch.utils.flop_counter.FlopCounterMode`` (convolution FLOPs / 2) and reported as a ratio to the
dense layer. Weights are random (latency does not depend on their values).

Timing: ``torch.inference_mode``, inputs fixed; all variants of a configuration are called
round-robin (the order rotates every round) for ``--rounds`` rounds after a warm-up, so
background load hits all of them alike. Reported: median and min milliseconds per forward, and
the latency ratio to dense as the median of the per-round ratios (each factorized call divided
by the dense call of the same round), which cancels slow drifts of the machine's load.

Target (issue 4): Tucker-2 and TT at <= 0.4x dense latency where MACs are 0.25x.

Run (writes benchmarks/results/layer_latency.{json,md})::

    nice -n 10 .venv/bin/python benchmarks/bench_layer_latency.py --threads 1,2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (
    RESULTS,
    LoadMonitor,
    command_line,
    finish_report,
    fmt,
    interleaved_times,
    machine_info,
    md_table,  # noqa: E402
    pin_threads,
    stats,
    write_json,
)
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

CONFIGS = [(64, 32), (512, 8)]
ALIGN = 16  # AVX-512 holds 16 floats
ALIGNED_METHODS = ("tucker2", "tt")


def count_macs(mod: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward call (convolutions and matmuls), batch included."""
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        mod(x)
    return fc.get_total_flops() // 2


def pick_ranks(
    cls: Any, geom: Any, hw: tuple[int, int], target_macs: float, align: int = 1
) -> tuple[int, ...]:
    from tensorcut.compression.rank import ranks_for_ratio

    mx = tuple(cls.max_ranks(geom))
    return tuple(ranks_for_ratio(mx, lambda r: cls.predicted_macs(geom, r, hw), target_macs, align))


def build_variants(
    c: int, hw: int, mac_ratio: float, with_tltorch: bool, seed: int
) -> dict[str, dict[str, Any]]:
    """name -> {module, ranks, predicted MAC ratio}; modules in eval mode with random weights."""
    from tensorcut.geometry import ConvGeometry
    from tensorcut.layers import LAYER_REGISTRY

    torch.manual_seed(seed)
    dense = nn.Conv2d(c, c, 3, padding=1, bias=False).eval()
    geom = ConvGeometry.from_conv(dense)
    dense_macs = geom.dense_macs((hw, hw))
    out: dict[str, dict[str, Any]] = {
        "dense nn.Conv2d": {"module": dense, "ranks": None, "lib": "torch", "method": "dense"}
    }
    ranks_of: dict[str, tuple[int, ...]] = {}
    for method in sorted(LAYER_REGISTRY):
        cls = LAYER_REGISTRY[method]
        r = pick_ranks(cls, geom, (hw, hw), mac_ratio * dense_macs)
        ranks_of[method] = r
        layer = cls(geom, r).eval()
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0.0, 0.05)
        out[f"tensorcut {method}"] = {
            "module": layer,
            "ranks": list(r),
            "lib": "tensorcut",
            "method": method,
            "predicted_mac_ratio": cls.predicted_macs(geom, r, (hw, hw)) / dense_macs,
        }
    for method in ALIGNED_METHODS:  # the planner's ratio rule with align=ALIGN, MACs as the cost
        cls = LAYER_REGISTRY[method]
        r = pick_ranks(cls, geom, (hw, hw), mac_ratio * dense_macs, ALIGN)
        layer = cls(geom, r).eval()
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0.0, 0.05)
        out[f"tensorcut {method} align{ALIGN}"] = {
            "module": layer,
            "ranks": list(r),
            "lib": "tensorcut",
            "method": method,
            "align": ALIGN,
            "predicted_mac_ratio": cls.predicted_macs(geom, r, (hw, hw)) / dense_macs,
        }
    if with_tltorch:
        import tltorch

        tl_ranks = {
            "cp": ranks_of["cp"][0],
            "tucker": (ranks_of["tucker2"][0], ranks_of["tucker2"][1], 3, 3),
            "tt": (1, *ranks_of["tt"], 1),
        }
        for fact, rank in tl_ranks.items():
            layer = tltorch.FactorizedConv(
                c, c, (3, 3), padding=1, factorization=fact, rank=rank, implementation="factorized"
            ).eval()
            layer.weight.normal_(0.0, 0.05)
            out[f"tltorch {fact}"] = {
                "module": layer,
                "ranks": list(rank) if isinstance(rank, tuple) else [rank],
                "lib": "tltorch",
                "method": "tucker2" if fact == "tucker" else fact,
            }
    return out


def add_channels_last(variants: dict[str, dict[str, Any]]) -> None:
    """The same modules (copies) in channels_last memory format, fed a channels_last input
    (tensorcut and dense only)."""
    import copy

    for name in [n for n, v in variants.items() if v["lib"] in ("torch", "tensorcut")]:
        v = variants[name]
        cl = dict(
            v,
            module=copy.deepcopy(v["module"]).to(memory_format=torch.channels_last),
            memory_format="channels_last",
        )
        variants[f"{name} [channels_last]"] = cl


def run_config(
    c: int,
    hw: int,
    batch: int,
    threads: int,
    rounds: int,
    mac_ratio: float,
    with_tltorch: bool,
    seed: int,
    max_seconds: float,
    channels_last: bool,
) -> dict[str, Any]:
    pin_threads(threads)
    variants = build_variants(c, hw, mac_ratio, with_tltorch, seed)
    if channels_last:
        add_channels_last(variants)
    x = torch.randn(batch, c, hw, hw)
    inputs = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    dense_macs = count_macs(variants["dense nn.Conv2d"]["module"], x)
    ref = None
    for name, v in variants.items():
        v.setdefault("memory_format", "contiguous")
        xin = inputs[v["memory_format"]]
        v["macs"] = count_macs(v["module"], xin)
        v["mac_ratio"] = v["macs"] / dense_macs
        v["params"] = sum(p.numel() for p in v["module"].parameters())
        with torch.inference_mode():
            y = v["module"](xin)
        if ref is None:
            ref = y.shape
        assert y.shape == ref, (name, y.shape, ref)

    def caller(m: nn.Module, xin: torch.Tensor):  # noqa: ANN202
        def f() -> None:
            with torch.inference_mode():
                m(xin)

        return f

    t0 = time.perf_counter()
    times = interleaved_times(
        {n: caller(v["module"], inputs[v["memory_format"]]) for n, v in variants.items()},
        rounds=rounds,
        warmup=3,
        max_seconds=max_seconds,
    )
    dense_t = times["dense nn.Conv2d"]
    dense_best = min(stats(times[n])["median"] for n in times if n.startswith("dense"))
    rows = []
    for name, v in variants.items():
        st = stats(times[name])
        same_fmt_dense = times[
            "dense nn.Conv2d"
            + (" [channels_last]" if v["memory_format"] == "channels_last" else "")
        ]
        paired = [a / b for a, b in zip(times[name], same_fmt_dense, strict=True)]
        rows.append(
            {
                "variant": name,
                "lib": v["lib"],
                "method": v["method"],
                "memory_format": v["memory_format"],
                "latency_ratio_vs_fastest_dense": st["median"] / dense_best,
                "ranks": v["ranks"],
                "params": v["params"],
                "macs": v["macs"],
                "mac_ratio": v["mac_ratio"],
                "predicted_mac_ratio": v.get("predicted_mac_ratio"),
                "ms_median": st["median"] * 1e3,
                "ms_min": st["min"] * 1e3,
                "ms_q1": st["q1"] * 1e3,
                "ms_q3": st["q3"] * 1e3,
                "rounds": st["n"],
                "latency_ratio": statistics.median(paired),
                "latency_ratio_of_medians": st["median"] / stats(dense_t)["median"],
            }
        )
    breakdown = stage_breakdown(variants, inputs, rounds=max(5, rounds // 4))
    return {
        "channels": c,
        "hw": hw,
        "batch": batch,
        "threads": threads,
        "dense_macs": dense_macs,
        "rows": rows,
        "stages": breakdown,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def stage_breakdown(
    variants: dict[str, dict[str, Any]], inputs: dict[str, torch.Tensor], rounds: int
) -> dict[str, Any]:
    """Milliseconds of each sublayer of the Tucker-2 and TT layers (and the dense conv),
    interleaved.

    Inputs of every sublayer are captured with forward pre-hooks on one real forward, then each
    sublayer is called alone on its captured arguments; an explicit padding (only for padding
    modes the convolutions cannot do themselves) is timed as its own stage.
    """
    from tensorcut.geometry import explicit_pad

    fns: dict[str, Any] = {}
    for name, v in variants.items():
        if not (
            v["lib"] == "torch" or (v["lib"] == "tensorcut" and v["method"] in ("tucker2", "tt"))
        ):
            continue
        m, xin = v["module"], inputs[v["memory_format"]]
        if v["lib"] == "torch":
            fns[f"{name} :: conv3x3"] = (m, (xin,))
            continue
        captured: dict[str, tuple[torch.Tensor, ...]] = {}
        hooks = [
            child.register_forward_pre_hook(
                lambda mod, inp, n=cn, c=captured: c.__setitem__(n, inp)
            )
            for cn, child in m.named_children()
        ]
        with torch.inference_mode():
            m(xin)
        for h in hooks:
            h.remove()
        for cn, child in m.named_children():
            fns[f"{name} :: {cn} {tuple(child.weight.shape)}"] = (child, captured[cn])
        if m._pad_explicitly:  # otherwise zero padding runs inside the spatial convs
            with torch.inference_mode():
                y1 = m.first(xin)
            fns[f"{name} :: explicit pad"] = (lambda t, g=m.geometry: explicit_pad(t, g), (y1,))

    def caller(f: Any, args: tuple[torch.Tensor, ...]):  # noqa: ANN202
        def g() -> None:
            with torch.inference_mode():
                f(*args)

        return g

    times = interleaved_times(
        {k: caller(f, t) for k, (f, t) in fns.items()}, rounds=rounds, warmup=1
    )
    return {k: round(stats(v)["median"] * 1e3, 3) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--threads",
        default="1,2",
        help="comma-separated thread counts to measure (each a separate pass)",
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="time budget of one configuration's timing loop",
    )
    ap.add_argument("--mac-ratio", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tltorch", action="store_true")
    ap.add_argument(
        "--no-channels-last",
        action="store_true",
        help="skip the channels_last copies of the variants",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "layer_latency")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    thread_list = [int(t) for t in args.threads.split(",")]
    try:
        import tltorch  # noqa: F401

        with_tltorch = not args.no_tltorch
    except ImportError:
        with_tltorch = False
    machine = machine_info(thread_list[0])
    machine["threads"] = args.threads
    result: dict[str, Any] = {
        "command": command_line(),
        "machine": machine,
        "args": {k: str(v) for k, v in vars(args).items()},
        "tltorch_available": with_tltorch,
        "configs": [],
    }
    t_all = time.perf_counter()
    with LoadMonitor() as mon:
        for threads in thread_list:
            for c, hw in CONFIGS:
                r = run_config(
                    c,
                    hw,
                    args.batch,
                    threads,
                    args.rounds,
                    args.mac_ratio,
                    with_tltorch,
                    args.seed,
                    args.max_seconds,
                    not args.no_channels_last,
                )
                r["load1_after"] = round(os.getloadavg()[0], 2)
                result["configs"].append(r)
                print(
                    f"threads {threads} C={c} {hw}x{hw}: "
                    + "; ".join(
                        f"{x['variant']} {x['ms_median']:.1f} ms (x{x['latency_ratio']:.2f}, MACs "
                        f"x{x['mac_ratio']:.3f})"
                        for x in r["rows"]
                    ),
                    flush=True,
                )
                result["load"] = mon.summary()
                write_json(args.out.with_suffix(".json"), result)
        result["load"] = mon.summary()
    finish_report(
        result,
        args.out,
        "Factorized conv layers: CPU forward latency vs dense nn.Conv2d",
        t_all,
        machine,
        targets,
        render,
    )


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for cfg in result["configs"]:
        for r in cfg["rows"]:
            if r["lib"] == "tensorcut" and r["method"] in ("tucker2", "tt"):
                out.append(
                    {
                        "config": f"C={cfg['channels']} {cfg['hw']}x{cfg['hw']} "
                        f"threads={cfg['threads']}",
                        "method": r["method"],
                        "variant": r["variant"].split(" [")[0].replace("tensorcut ", ""),
                        "ranks": "x".join(map(str, r["ranks"])),
                        "memory_format": r["memory_format"],
                        "mac_ratio": round(r["mac_ratio"], 3),
                        "latency_ratio": round(r["latency_ratio"], 3),
                        "latency_ratio_vs_fastest_dense": round(
                            r["latency_ratio_vs_fastest_dense"], 3
                        ),
                        "met": bool(
                            r["latency_ratio"] <= 0.4 and r["latency_ratio_vs_fastest_dense"] <= 0.4
                        ),
                    }
                )
    return out


def render(result: dict[str, Any]) -> str:
    parts = [
        f"Batch {result['configs'][0]['batch'] if result['configs'] else '?'}, 3x3 kernels, "
        "padding 1, stride 1, no bias, float32, `torch.inference_mode`. Ranks chosen so the "
        "closed-form MACs are <= 0.25x dense; `MACs x` is the ratio actually executed "
        "(FlopCounterMode). `latency x` = median over rounds of (variant time / dense time in the "
        "same round). tltorch layers use the same ranks as tensorcut's (CP: R; Tucker: (r_out, "
        "r_in, 3, 3), the Tucker-2 structure; TT: (1, r1, r2, r3, 1)). `alignN` variants: ranks "
        "from the planner's ratio rule with `align=N` and MACs as the cost "
        "(`tensorcut.compression.rank.ranks_for_ratio`: multiples of N, grown greedily under the "
        "same MAC cap), because convolutions over channel counts that are multiples of the SIMD "
        "width run markedly faster. tensorcut's 1x1 sublayers run as GEMMs with channels-last "
        "intermediates (`PointwiseConv2d`); a layer's output has its input's memory format.",
    ]
    if result.get("targets"):
        rows = [
            (
                t["config"],
                t.get("variant", t["method"]),
                t.get("ranks", ""),
                t["memory_format"],
                t["mac_ratio"],
                t["latency_ratio"],
                t["latency_ratio_vs_fastest_dense"],
                "met" if t["met"] else "**missed**",
            )
            for t in result["targets"]
        ]
        parts.append(
            "## Target: Tucker-2 and TT at <= 0.4x dense latency (MACs ~0.25x)\n"
            "\n"
            "`latency x`: vs the dense conv in the same memory format (paired per round); `vs "
            "fastest dense`: median vs the faster of the two dense formats. Met = both <= 0.4.\n\n"
            + md_table(
                [
                    "configuration",
                    "variant",
                    "ranks",
                    "memory format",
                    "MACs x",
                    "latency x",
                    "vs fastest dense",
                    "",
                ],
                rows,
            )
        )
    for cfg in result["configs"]:
        head = [
            "variant",
            "ranks",
            "params",
            "MACs x",
            "median ms",
            "min ms",
            "IQR ms",
            "latency x",
            "vs fastest dense",
            "rounds",
        ]
        rows = [
            (
                r["variant"],
                "x".join(map(str, r["ranks"])) if r["ranks"] else "-",
                f"{r['params']:,}",
                f"{r['mac_ratio']:.3f}",
                fmt(r["ms_median"], 4),
                fmt(r["ms_min"], 4),
                f"{r['ms_q1']:.1f}-{r['ms_q3']:.1f}",
                f"{r['latency_ratio']:.3f}",
                f"{r['latency_ratio_vs_fastest_dense']:.3f}",
                r["rounds"],
            )
            for r in cfg["rows"]
        ]
        parts.append(
            f"## {cfg['channels']} channels at {cfg['hw']}x{cfg['hw']}, batch {cfg['batch']}, "
            f"{cfg['threads']} thread(s) (dense {cfg['dense_macs'] / 1e9:.2f} GMAC per call; 1-min "
            f"load after: {cfg.get('load1_after')})\n\n" + md_table(head, rows)
        )
        if cfg.get("stages"):
            st = [(k.split(" :: ")[0], k.split(" :: ")[1], v) for k, v in cfg["stages"].items()]
            parts.append(
                "Per-stage median ms (each sublayer alone on its captured input):\n\n"
                + md_table(["variant", "stage", "ms"], st)
            )
    parts.append(
        f"Total wall time {result.get('total_seconds')} s; `uptime` at the end: "
        f"`{result.get('uptime_at_end')}`."
    )
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
