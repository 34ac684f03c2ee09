"""tensorcut on real timm / torchvision architectures: exact, verified or a crash, per model/method.

Every architecture of ``tests/real_networks/_realnet_registry.py`` (issue 14; random weights,
float64, every conv selected) is compressed with Tucker-2 at full rank (must reproduce the model:
"exact" when the output is within 1e-8 relative) and Tucker-2 at ratio 0.7 ("verified" when the
model runs, and the plan's parameter / MAC totals equal the model's real parameter count,
``summarize`` and a FlopCounterMode count); a subset also with CP / TT / TR at ratio 0.7. Anything
else is reported with its message. Results go to ``benchmarks/results/real_networks.{json,md}``; the
JSON is rewritten after every case, and ``--resume`` skips cases already in it.

    nice -n 19 .venv/bin/python benchmarks/bench_real_networks.py [--archs a,b] [--resume]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "real_networks"))

from _realnet_registry import (  # noqa: E402
    ARCHS,
    Arch,
    build,
    by_id,
    clone,
    full_rank,
    make_input,
    measured_macs,
    param_count,
    rel_err,
    run_compress,
)
from common import (
    RESULTS,
    LoadMonitor,
    command_line,
    fmt,
    machine_info,
    md_table,
    pin_threads,
    uptime_line,
    write_json,
    write_markdown,
)  # noqa: E402

OUT = RESULTS / "real_networks"
EXACT = 1e-8
#: Architectures also compressed with CP / TT / TR at ratio 0.7 (small enough for CP's ALS).
SUBSET = (
    "shared_conv_net",
    "custom_forward_net",
    "qat_mixed",
    "timm_test_nfnet",
    "timm_dm_nfnet_micro",
    "timm_test_resnet",
    "timm_test_efficientnet_same",
    "timm_test_convnext",
    "timm_resnetv2_bit_same_micro",
    "tv_shufflenet_v2_x0_5",
    "tv_squeezenet1_1",
    "timm_edgenext_xx_small_d1",
)


def cases(archs: list[Arch]) -> list[tuple[str, str, str]]:
    """(arch id, method, rule) in run order: each arch at tucker2 full/0.7, SUBSET cp/tt/tr 0.7."""
    out = []
    for a in archs:
        out += [(a.id, "tucker2", "full"), (a.id, "tucker2", "0.7")]
    for a in archs:
        if a.id in SUBSET:
            out += [(a.id, m, "0.7") for m in ("cp", "tt", "tr")]
    return out


def run_case(arch: Arch, method: str, rule: str) -> dict[str, Any]:
    """Compress one architecture; everything measured, nothing asserted."""
    from tensorcut.summary import summarize

    rec: dict[str, Any] = {
        "arch": arch.id,
        "method": method,
        "rule": rule,
        "input": [3, arch.size, arch.size],
    }
    model = build(arch)
    ref = clone(model)
    x = make_input(arch)
    with torch.no_grad():
        y_ref = ref(x)
    rec["params_before"] = param_count(ref)
    rec["macs_before"], _ = measured_macs(ref, x[:1])
    t0 = time.perf_counter()
    try:
        kw: dict[str, Any] = {"rank": full_rank()} if rule == "full" else {"ratio": float(rule)}
        model, plan = run_compress(model, arch, method, **kw)
    except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
        rec.update(
            status="crash in compress",
            message=f"{type(e).__name__}: {e}"[:400],
            trace=traceback.format_exc()[-1500:],
        )
        return rec
    rec["compress_seconds"] = round(time.perf_counter() - t0, 1)
    layers = plan.layers
    rec["factorized"] = sum(lp.status == "factorize" for lp in layers)
    rec["dense"] = sum(lp.status != "factorize" for lp in layers)
    rec["dense_reasons"] = dict(
        Counter(_reason_class(lp.reason) for lp in layers if lp.status != "factorize")
    )
    oes = [getattr(lp, "output_error", None) for lp in layers if lp.status == "factorize"]
    oes_f = [float(o) for o in oes if o is not None]
    rec["max_layer_output_error"] = max(oes_f) if oes_f else None
    rec["missing_output_errors"] = sum(o is None for o in oes)
    rec["max_kernel_error"] = max(
        (float(lp.error) for lp in layers if lp.status == "factorize" and lp.error is not None),
        default=None,
    )
    t = plan.totals()
    rec["plan"] = {
        k: t[k]
        for k in (
            "model_params_before",
            "model_params_after",
            "model_macs_before",
            "model_macs_after",
        )
    }
    try:
        with torch.no_grad():
            y = model(x)
        rec["output_error"] = rel_err(y, y_ref) if y.shape == y_ref.shape else None
        if y.shape != y_ref.shape:
            raise RuntimeError(f"output shape {tuple(y.shape)} != {tuple(y_ref.shape)}")
        rec["params_after"] = param_count(model)
        rec["macs_after"], everything = measured_macs(model, x[:1])
        rec["summarize_macs_after"] = summarize(model, (3, arch.size, arch.size)).total_macs
    except Exception as e:  # noqa: BLE001
        rec.update(
            status="crash after compress",
            message=f"{type(e).__name__}: {e}"[:400],
            trace=traceback.format_exc()[-1500:],
        )
        return rec
    problems = []
    if rec["plan"]["model_params_after"] != rec["params_after"]:
        problems.append(
            f"plan params {rec['plan']['model_params_after']:,} != model {rec['params_after']:,}"
        )
    if rec["plan"]["model_params_before"] != rec["params_before"]:
        problems.append(
            f"plan params before {rec['plan']['model_params_before']:,} != model "
            f"{rec['params_before']:,}"
        )
    if rec["plan"]["model_macs_after"] != rec["macs_after"]:
        problems.append(
            f"plan MACs {rec['plan']['model_macs_after']:,} != measured {rec['macs_after']:,}"
        )
    if rec["plan"]["model_macs_before"] != rec["macs_before"]:
        problems.append(
            f"plan MACs before {rec['plan']['model_macs_before']:,} != measured "
            f"{rec['macs_before']:,}"
        )
    if rec["summarize_macs_after"] != rec["macs_after"]:
        problems.append(
            f"summarize MACs {rec['summarize_macs_after']:,} != measured {rec['macs_after']:,}"
        )
    if not math.isfinite(rec["output_error"]):
        problems.append("non-finite output")
    if rule == "full" and method in ("tucker2", "tucker", "tt") and rec["output_error"] > EXACT:
        problems.insert(0, f"WRONG OUTPUT: {rec['output_error']:.2e} relative at full rank")
    if rec["missing_output_errors"]:
        problems.append(f"{rec['missing_output_errors']} factorized layers without output_error")
    if problems:
        rec.update(status="FAIL", message="; ".join(problems))
    elif rule == "full":
        rec.update(
            status="exact" if rec["factorized"] else "exact (nothing factorized)", message=""
        )
    else:
        rec.update(status="verified", message="")
    return rec


def _reason_class(reason: str) -> str:
    """A dense reason without its per-layer numbers, so equal causes group together."""
    import re

    r = re.sub(r"\(\d[\d,]* >= \d[\d,]* params\)", "(n >= m params)", reason or "(no reason)")
    return re.sub(r"\b\d[\d,]*\b", "N", r)[:160]


def render(result: dict[str, Any]) -> str:
    """The markdown body: summary line, the table, then the distinct dense reasons and failures."""
    rows, fails = [], []
    recs = result["cases"]
    counts = Counter(r["status"] for r in recs)
    legend: dict[str, str] = {}
    for r in recs:
        for k in sorted(r.get("dense_reasons", {})):
            legend.setdefault(k, f"R{len(legend) + 1}")
    for r in recs:
        pb, pa = r.get("params_before"), r.get("params_after")
        mb, ma = r.get("macs_before"), r.get("macs_after")
        reasons = ", ".join(
            f"{legend[k]} x{v}" for k, v in sorted(r.get("dense_reasons", {}).items())
        )
        rows.append(
            (
                r["arch"],
                f"{r['method']} {r['rule']}",
                r["status"],
                f"{pb:,} → {pa:,}" if pa is not None else f"{pb:,} → -",
                f"{mb:,} → {ma:,}" if ma is not None else f"{mb:,} → -",
                fmt(r.get("output_error"), 3),
                fmt(r.get("max_layer_output_error"), 3),
                f"{r.get('factorized', '-')} / {r.get('dense', '-')}",
                reasons or "-",
                r.get("compress_seconds", "-"),
            )
        )
        if r["status"] not in ("exact", "verified", "exact (nothing factorized)"):
            fails.append(
                f"- **{r['arch']}** {r['method']} {r['rule']}: {r['status']} — "
                f"{r.get('message', '')}"
            )
    body = [
        f"{len(recs)} cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".",
        "",
        "exact: output within 1e-8 relative of the uncompressed model at full rank; verified: "
        "runs, and the plan's parameter and MAC totals equal the model's real parameter count, "
        "`summarize` and a FlopCounterMode count (conv + linear modules and factorized layers; "
        "attention matmuls excluded). Output error: relative (norm-wise) error of the whole "
        "model's output; max layer: the largest `output_error` in the plan. Random weights, "
        "float64, 10 classes, every conv selected.",
        "",
        md_table(
            (
                "model",
                "method",
                "status",
                "params before → after",
                "MACs before → after",
                "output err",
                "max layer err",
                "factorized / dense",
                "dense reasons",
                "compress s",
            ),
            rows,
        ),
    ]
    if legend:
        body += ["", "## Why layers were left dense", ""] + [
            f"- {v}: {k}" for k, v in legend.items()
        ]
    if fails:
        body += ["", "## Failures", ""] + fails
    if result.get("not_run"):
        body += ["", f"Not run (out of time): {', '.join(result['not_run'])}"]
    return "\n".join(body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="", help="comma-separated registry ids (default: all)")
    ap.add_argument("--methods", default="", help="comma-separated methods to run (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="skip cases already in the JSON")
    ap.add_argument(
        "--deadline",
        type=float,
        default=0.0,
        help="stop starting new cases after this many seconds",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the markdown from the JSON (e.g. of a run stopped early); cases not in it "
        "are listed as not run",
    )
    args = ap.parse_args(argv)
    pin_threads(args.threads)
    archs = [by_id(a) for a in args.archs.split(",")] if args.archs else list(ARCHS)
    todo = [c for c in cases(archs) if not args.methods or c[1] in args.methods.split(",")]
    if args.report_only:
        return _report_only(args.out, todo)
    machine = machine_info(args.threads)
    result: dict[str, Any] = {
        "command": command_line(),
        "machine": machine,
        "cases": [],
        "not_run": [],
    }
    json_path = args.out.with_suffix(".json")
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        result["cases"] = [c for c in old.get("cases", []) if "status" in c]
    done = {(c["arch"], c["method"], c["rule"]) for c in result["cases"]}
    t_start = time.perf_counter()
    with LoadMonitor() as load:
        for arch_id, method, rule in todo:
            if (arch_id, method, rule) in done:
                continue
            if args.deadline and time.perf_counter() - t_start > args.deadline:
                result["not_run"].append(f"{arch_id}/{method} {rule}")
                continue
            t = time.perf_counter()
            try:
                rec = run_case(by_id(arch_id), method, rule)
            except Exception as e:  # noqa: BLE001 - building the model or the reference failed
                rec = {
                    "arch": arch_id,
                    "method": method,
                    "rule": rule,
                    "status": "crash (setup)",
                    "message": f"{type(e).__name__}: {e}"[:400],
                    "params_before": 0,
                    "macs_before": 0,
                }
            rec["seconds"] = round(time.perf_counter() - t, 1)
            result["cases"].append(rec)
            print(
                f"{arch_id:40s} {method:8s} {rule:5s} {rec['status']:24s} {rec['seconds']:7.1f}s "
                f"{rec.get('message', '')[:150]}",
                flush=True,
            )
            result["load"] = load.summary()
            write_json(json_path, result)
            gc.collect()
        result["load"] = load.summary()
    result["uptime_at_end"] = uptime_line()
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    order = {c: i for i, c in enumerate(todo)}
    result["cases"].sort(key=lambda c: order.get((c["arch"], c["method"], c["rule"]), len(order)))
    write_json(json_path, result)
    write_markdown(
        args.out.with_suffix(".md"),
        "tensorcut on real timm / torchvision architectures",
        result["command"],
        render(result),
        machine,
        result["load"],
    )
    print(f"wrote {json_path} and .md in {result['total_seconds']} s")
    return 0


def _report_only(out: Path, todo: list[tuple[str, str, str]]) -> int:
    result = json.loads(out.with_suffix(".json").read_text())
    done = {(c["arch"], c["method"], c["rule"]) for c in result["cases"]}
    result["not_run"] = [f"{a}/{m} {r}" for a, m, r in todo if (a, m, r) not in done]
    order = {c: i for i, c in enumerate(todo)}
    result["cases"].sort(key=lambda c: order.get((c["arch"], c["method"], c["rule"]), len(order)))
    load = result.get("load")
    write_markdown(
        out.with_suffix(".md"),
        "tensorcut on real timm / torchvision architectures",
        result["command"],
        render(result),
        result["machine"],
        load,
    )
    print(
        f"wrote {out.with_suffix('.md')} ({len(result['cases'])} cases, {len(result['not_run'])} "
        "not run)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
