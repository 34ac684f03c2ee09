"""Benchmark: single-layer truncation sweep with the activation cache vs naive re-evaluation.

On ``vanilla-cnn`` with Fashion-MNIST test images, for every selected layer, side by side
in one run (interleaved layer by layer so that machine load hits all three alike):

- **cached**: ``tensorcut.study.analyze`` on that layer (all seven bipartitions, default
  keep grids): SVD once per (layer, bipartition), activation cache, rest-of-network only,
  SQLite rows — the real end-to-end cost;
- **naive**: for the same configurations, a fresh SVD, the truncated kernel swapped in, and a
  full ``tensorcut.train.loop.evaluate`` over the DataLoader;
- **floor**: the rest-of-network forward pass alone (cached inputs, original weights), once
  per configuration — the least any exact suffix-caching scheme can cost.

It also checks that cached and naive runs give identical loss / top-1 / top-5 for every
configuration. Writes ``benchmarks/results/sweep_cache.json`` and ``sweep_cache.md``.

Usage (from the repository root)::

    nice .venv/bin/python benchmarks/bench_sweep_cache.py \\
        [--width 0.25] [--subset 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from tensorcut import data as tdata
from tensorcut import models
from tensorcut.study import grid
from tensorcut.study.cache import EvalSet, LayerRunner
from tensorcut.study.store import ResultsStore
from tensorcut.study.sweep import analyze
from tensorcut.tenalg import BIPARTITIONS, svd_bipartition
from tensorcut.train.loop import evaluate

RESULTS = Path(__file__).resolve().parent / "results"


class _Clock:
    """Wall time and this process's CPU time (the fair measure on a shared, oversubscribed host)."""

    def __enter__(self) -> _Clock:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def _naive(
    model: torch.nn.Module, layer: str, configs: list[tuple[str, int]], loader: object
) -> tuple[_Clock, dict]:
    conv = model.get_submodule(layer)
    K = conv.weight.detach().clone()
    out = {}
    with _Clock() as clock:
        for bip, k in configs:
            Kt = svd_bipartition(K, bip).truncate(k)
            with torch.no_grad():
                conv.weight.copy_(Kt)
            out[(bip, k)] = evaluate(model, loader, "cpu")
    with torch.no_grad():
        conv.weight.copy_(K)
    return clock, out


def _floor(model: torch.nn.Module, layer: str, n_configs: int, es: EvalSet) -> _Clock:
    with LayerRunner(model, layer, es) as runner:
        with _Clock() as clock:
            for _ in range(n_configs):
                runner.evaluate()
        return clock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument(
        "--subset", type=int, default=1000, help="Fashion-MNIST test images (0 = all 10000)"
    )
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is stable on a shared machine)"
    )
    ap.add_argument("--layers", nargs="+", default=None)
    ap.add_argument("--out", default=str(RESULTS / "sweep_cache"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = tdata.dataset_info("fashion-mnist")
    model = models.create(
        "vanilla-cnn",
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        width=args.width,
        input_size=info.image_size,
    ).eval()
    ds = tdata.load_dataset("fashion-mnist", "test", subset=args.subset or None)
    loader = tdata.make_loader(ds, args.batch_size)
    es = EvalSet(loader)
    layers = grid.select_layers(model, args.layers)
    # warm-up (allocator, oneDNN primitives)
    evaluate(model, loader, "cpu")
    per_layer = []
    mismatches = 0
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "sweep.sqlite"
        # the baseline row is a one-off per analysis, not per configuration: record it before timing
        t0 = time.perf_counter()
        analyze(
            model,
            {"test": loader},
            db,
            layers=layers,
            single_layer=False,
            progress=False,
            csv=False,
        )
        t_baseline = time.perf_counter() - t0
        for layer in layers:
            shape = model.get_submodule(layer).weight.shape
            configs = [
                (b, k)
                for b in BIPARTITIONS
                for k in grid.default_keep_grid(grid.n_singular(shape, b))
            ]
            with _Clock() as c_cached:
                rep = analyze(
                    model, {"test": loader}, db, layers=[layer], progress=False, csv=False
                )
            c_naive, naive = _naive(model, layer, configs, loader)
            c_floor = _floor(model, layer, len(configs), es)
            with ResultsStore(db) as st:
                for r in st.rows(kind="single", layer=layer):
                    n = naive[(r["bipartition"], int(r["keep"]))]
                    if (r["loss"], r["top1"], r["top5"]) != (n["loss"], n["top1"], n["top5"]):
                        mismatches += 1
            per_layer.append(
                {
                    "layer": layer,
                    "shape": list(shape),
                    "configs": len(configs),
                    "fast_path": rep.fast_path.get(layer, "") == "",
                    "cached_s": c_cached.cpu,
                    "naive_s": c_naive.cpu,
                    "floor_s": c_floor.cpu,
                    "cached_wall_s": c_cached.wall,
                    "naive_wall_s": c_naive.wall,
                    "floor_wall_s": c_floor.wall,
                    "speedup_vs_naive": c_naive.cpu / c_cached.cpu,
                    "ratio_to_floor": c_cached.cpu / c_floor.cpu,
                }
            )
            print(
                f"{layer} {tuple(shape)}: {len(configs)} configs  CPU s: cached {c_cached.cpu:.1f} "
                f" naive {c_naive.cpu:.1f}  floor {c_floor.cpu:.1f}  (wall {c_cached.wall:.1f} / "
                f"{c_naive.wall:.1f} / {c_floor.wall:.1f})",
                flush=True,
            )
    keys = (
        "configs",
        "cached_s",
        "naive_s",
        "floor_s",
        "cached_wall_s",
        "naive_wall_s",
        "floor_wall_s",
    )
    tot = {k: sum(p[k] for p in per_layer) for k in keys}
    res = {
        "model": f"vanilla-cnn width {args.width} (random init, eval mode)",
        "data": f"fashion-mnist test, {len(ds)} images, batch {args.batch_size}",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "layers": per_layer,
        "total": tot,
        "time_measure": "process CPU time (single-threaded torch); wall times under *_wall_s",
        "speedup_vs_naive": tot["naive_s"] / tot["cached_s"],
        "ratio_to_floor": tot["cached_s"] / tot["floor_s"],
        "amdahl_bound": tot["naive_s"] / tot["floor_s"],
        "speedup_vs_naive_wall": tot["naive_wall_s"] / tot["cached_wall_s"],
        "ratio_to_floor_wall": tot["cached_wall_s"] / tot["floor_wall_s"],
        "results_identical": mismatches == 0,
        "mismatches": mismatches,
        "baseline_and_spectra_s": t_baseline,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Sweep with activation cache vs naive re-evaluation",
        "",
        f"Model: {res['model']}. Data: {res['data']}. {args.threads} threads, torch "
        f"{torch.__version__}.",
        "Sweep: every default-eligible layer x all seven bipartitions x the shape-derived keep "
        "grid.",
        "",
        "Times are this process's CPU seconds (torch single-threaded): the machine is shared and "
        "oversubscribed, so",
        "wall time mostly measures other people's load; wall-clock totals are given below the "
        "table.",
        "",
        "| layer | kernel | configs | cached s | naive s | floor s | speed-up vs naive | cached / "
        "floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in per_layer:
        lines.append(
            f"| {p['layer']} | {'x'.join(map(str, p['shape']))} | {p['configs']} | "
            f"{p['cached_s']:.1f} | {p['naive_s']:.1f} | {p['floor_s']:.1f} | "
            f"{p['speedup_vs_naive']:.2f}x | {p['ratio_to_floor']:.2f} |"
        )
    lines += [
        f"| **all** | | {tot['configs']} | {tot['cached_s']:.1f} | {tot['naive_s']:.1f} | "
        f"{tot['floor_s']:.1f} | **{res['speedup_vs_naive']:.2f}x** | "
        f"**{res['ratio_to_floor']:.2f}** |",
        "",
        f"Wall clock (same run): cached {tot['cached_wall_s']:.1f} s, naive "
        f"{tot['naive_wall_s']:.1f} s, floor {tot['floor_wall_s']:.1f} s; speed-up "
        f"{res['speedup_vs_naive_wall']:.2f}x, cached / floor {res['ratio_to_floor_wall']:.2f}.",
        f"Cached and naive results identical for every configuration: {res['results_identical']}.",
        "Upper bound for any exact rest-of-network cache on this model (naive / floor): "
        f"{res['amdahl_bound']:.2f}x.",
        "One-off baseline evaluation + spectra before the sweep (not in the table): "
        f"{t_baseline:.1f} s.",
        "",
        "cached = `analyze()` end to end (SVD once per bipartition, prefix pass, rest-of-network "
        "evaluations, SQLite rows); naive = fresh SVD + full `evaluate()` over the DataLoader per "
        "configuration; floor = rest-of-network forward passes alone, one per configuration.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
