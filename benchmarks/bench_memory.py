"""Peak memory of decomposing the largest conv layers of vgg19 / resnet50 and of a truncation sweep.

Each measurement runs in a fresh child process (``--child``): the kernel is built first,
then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), the decomposition runs,
and the report gives

* ``rss_peak_delta_mb``: peak resident memory during the step minus resident memory before
  it — everything, torch's allocator and LAPACK workspaces included (Linux ``VmHWM``; where
  the mark cannot be reset, ``ru_maxrss`` from ``resource.getrusage`` is used instead);
* ``tracemalloc_peak_mb``: the Python-heap part (numpy buffers, lists), which torch's own
  allocator does not report to tracemalloc;
* ``x_kernel``: the RSS delta in units of the float32 kernel's size.

The stated bound (``BOUND_X_KERNEL``) is checked for every decomposition and the script
exits with status 1 if one exceeds it. Results go to ``benchmarks/results/memory.json`` and
``memory.md``. Defaults are sized for a shared 2-core CPU:

    nice python benchmarks/bench_memory.py            # all cases (a few minutes)
    nice python benchmarks/bench_memory.py --quick    # 256-channel kernels, for a smoke check
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
#: Working memory of any decomposition, in units of the float32 kernel it decomposes, plus a
#: fixed allowance for LAPACK/BLAS workspaces and allocator slack.
BOUND_X_KERNEL = 24.0
BOUND_FIXED_MB = 64.0


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _largest_convs() -> dict[str, tuple[str, tuple[int, int, int, int]]]:
    """Shapes of vgg19's largest 3x3 conv and resnet50's largest 1x1 conv (built without memory)."""
    import torch
    from torch import nn

    from tensorcut import models

    out = {}
    for model, want in (("vgg19", (3, 3)), ("resnet50", (1, 1)), ("resnet50", (3, 3))):
        with torch.device("meta"):
            net = models.create(model, num_classes=100)
        convs = [
            (n, m)
            for n, m in net.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == want
        ]
        name, conv = max(convs, key=lambda nm: nm[1].weight.numel())
        out[f"{model}:{name}"] = (name, tuple(conv.weight.shape))
    return out


def _case_ranks(method: str, shape: tuple[int, ...]) -> tuple[Any, dict[str, Any]]:
    """Ranks (~a quarter of each mode) and options for a decomposition; CP-ALS iterations capped."""
    o, i, kh, kw = shape
    q = lambda n: max(1, n // 4)  # noqa: E731
    if method == "tucker2":
        return (q(o), q(i)), {}
    if method == "tucker":
        return (q(o), q(i), kh, kw), {}
    if method == "cp":
        return min(256, q(o)), {"n_iter_max": 10, "n_restarts": 1}
    if method == "tt":
        return (q(i), q(i) * kh, q(o)), {}
    if method == "tr":
        return (2, q(o) // 2, q(i) // 2, max(1, kh)), {}
    raise ValueError(method)


def child_decompose(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one decomposition in this (fresh) process."""
    import torch
    from torch import nn

    import tensorcut.layers  # noqa: F401
    from tensorcut.layers.base import LAYER_REGISTRY

    torch.set_num_threads(int(spec.get("threads", 1)))
    o, i, kh, kw = spec["shape"]
    torch.manual_seed(0)
    conv = nn.Conv2d(i, o, (kh, kw), padding=(kh // 2, kw // 2), bias=False)
    ranks, opts = _case_ranks(spec["method"], tuple(spec["shape"]))
    cls = LAYER_REGISTRY[spec["method"]]
    import warnings

    with (
        warnings.catch_warnings()
    ):  # warm-up: lazy imports and LAPACK/BLAS library loads happen here, not below
        warnings.simplefilter("ignore")
        small = nn.Conv2d(8, 8, (kh, kw), bias=False)
        cls.from_conv(small, _case_ranks(spec["method"], (8, 8, kh, kw))[0], **opts)
    del small
    gc.collect()
    before = _rss_mb("VmRSS")
    reset = _reset_peak()
    tracemalloc.start()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = cls.from_conv(conv, ranks, **opts)
    seconds = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = (
        _rss_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    )
    kernel_mb = conv.weight.numel() * 4 / 2**20
    delta = max(0.0, peak - before)
    return {
        "kind": "decompose",
        "layer": spec["layer"],
        "shape": list(spec["shape"]),
        "method": spec["method"],
        "ranks": list(layer.ranks),
        "seconds": round(seconds, 2),
        "kernel_mb": round(kernel_mb, 2),
        "rss_before_mb": round(before, 1),
        "rss_peak_delta_mb": round(delta, 1),
        "tracemalloc_peak_mb": round(py_peak / 2**20, 2),
        "x_kernel": round(delta / kernel_mb, 2),
        "bound_mb": round(BOUND_X_KERNEL * kernel_mb + BOUND_FIXED_MB, 1),
        "within_bound": delta <= BOUND_X_KERNEL * kernel_mb + BOUND_FIXED_MB,
        "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss",
    }


def child_sweep(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure a truncation sweep (single-layer SVD on cached activations) in this process."""
    import tempfile

    import torch

    from tensorcut import data as tdata
    from tensorcut import models
    from tensorcut.study.sweep import analyze

    torch.set_num_threads(int(spec.get("threads", 1)))
    torch.manual_seed(0)
    net = models.create(
        spec["model"], width=spec["width"], num_classes=10, in_channels=3, input_size=16
    ).eval()
    ds = tdata.load_dataset("synthetic", "val", subset=spec["images"])
    loader = tdata.make_loader(ds, 100)
    gc.collect()
    with tempfile.TemporaryDirectory() as td:
        before = _rss_mb("VmRSS")
        reset = _reset_peak()
        tracemalloc.start()
        t0 = time.perf_counter()
        rep = analyze(
            net,
            loader,
            Path(td) / "r.sqlite",
            bipartitions=["OUT", "OUT-IN"],
            keep=["1,2,4"],
            cache_bytes=int(spec["cache_mb"] * 2**20),
            csv=False,
            progress=False,
        )
        seconds = time.perf_counter() - t0
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peak = (
            _rss_mb("VmHWM")
            if reset
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        )
    params_mb = sum(p.numel() for p in net.parameters()) * 4 / 2**20
    return {
        "kind": "sweep",
        "model": spec["model"],
        "width": spec["width"],
        "images": spec["images"],
        "configurations": rep.evaluated,
        "layers": len(rep.layers),
        "cache_budget_mb": spec["cache_mb"],
        "model_mb": round(params_mb, 2),
        "seconds": round(seconds, 1),
        "rss_before_mb": round(before, 1),
        "rss_peak_delta_mb": round(max(0.0, peak - before), 1),
        "tracemalloc_peak_mb": round(py_peak / 2**20, 2),
        "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss",
    }


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 1)), PYTHONWARNINGS="ignore")
    r = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if r.returncode != 0:
        return {**spec, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _markdown(rows: list[dict[str, Any]], command: str, machine: dict[str, Any]) -> str:
    lines = [
        "# Peak memory: decomposing the largest layers, and a truncation sweep",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, Python "
        f"{machine['python']}, device cpu, {machine['threads']} thread(s). Each row ran in a fresh "
        "process; the RSS delta is the peak resident memory during the step minus resident memory "
        "just before it.",
        "",
        f"Bound checked: RSS delta <= {BOUND_X_KERNEL:g} x (float32 kernel size) + "
        f"{BOUND_FIXED_MB:g} MB.",
        "",
        "| layer | shape | method | ranks | kernel MB | RSS peak delta MB | x kernel | tracemalloc "
        "MB | s | within bound |",
        "|---|---|---|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        if r.get("kind") != "decompose":
            continue
        if "error" in r:
            lines.append(
                f"| {r['layer']} | {r['shape']} | {r['method']} | error: {r['error']} | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['method']} | "
            f"{tuple(r['ranks'])} | {r['kernel_mb']} | {r['rss_peak_delta_mb']} | {r['x_kernel']} "
            f"| {r['tracemalloc_peak_mb']} | {r['seconds']} | "
            f"{'yes' if r['within_bound'] else '**no**'} |"
        )
    sweeps = [r for r in rows if r.get("kind") == "sweep"]
    if sweeps:
        lines += [
            "",
            "| sweep | layers | configurations | images | cache budget MB | model MB | RSS peak "
            "delta MB | tracemalloc MB | s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sweeps:
            if "error" in r:
                lines.append(f"| {r.get('model')} | error: {r['error']} | | | | | | | |")
                continue
            lines.append(
                f"| {r['model']} width {r['width']} | {r['layers']} | {r['configurations']} | "
                f"{r['images']} | {r['cache_budget_mb']} | {r['model_mb']} | "
                f"{r['rss_peak_delta_mb']} | {r['tracemalloc_peak_mb']} | {r['seconds']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every case in a child process; write JSON + markdown; exit 1 if a bound is exceeded."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--methods", default="tucker2,tucker,cp,tt,tr")
    p.add_argument("--quick", action="store_true", help="256-channel kernels only, no sweep")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "memory"), help="results path without suffix")
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        res = child_decompose(spec) if spec["kind"] == "decompose" else child_sweep(spec)
        print(json.dumps(res))
        return 0
    import torch

    if args.quick:
        layers = {"synthetic:256x256x3x3": ("conv", (256, 256, 3, 3))}
    else:
        layers = _largest_convs()
    rows: list[dict[str, Any]] = []
    for key, (_, shape) in layers.items():
        for method in args.methods.split(","):
            row = _run_child(
                {
                    "kind": "decompose",
                    "layer": key,
                    "shape": list(shape),
                    "method": method,
                    "threads": args.threads,
                }
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    if not args.quick:
        for model, width in (("resnet20", 1.0), ("vgg11", 0.5)):
            row = _run_child(
                {
                    "kind": "sweep",
                    "model": model,
                    "width": width,
                    "images": 500,
                    "cache_mb": 256,
                    "threads": args.threads,
                }
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "bound": {"x_kernel": BOUND_X_KERNEL, "fixed_mb": BOUND_FIXED_MB},
    }
    command = (
        "nice python benchmarks/bench_memory.py"
        + (" --quick" if args.quick else "")
        + (f" --methods {args.methods}" if args.methods != "tucker2,tucker,cp,tt,tr" else "")
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from tensorcut.checkpoint.io import atomic_write_text

    atomic_write_text(
        out.with_suffix(".json"),
        json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2),
    )
    atomic_write_text(out.with_suffix(".md"), _markdown(rows, command, machine))
    bad = [
        r
        for r in rows
        if r.get("kind") == "decompose" and (("error" in r) or not r["within_bound"])
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
