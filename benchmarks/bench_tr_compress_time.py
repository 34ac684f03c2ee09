"""Time the RSDTR search over every convolution of a whole network, against a naive search.

For each model (randomly initialised, CIFAR form) and each eps, ``rsdtr`` is run on every
Conv2d kernel (objective: fewest parameters), and the wall time, chosen ring ranks, relative
errors, parameter and MAC compression are recorded. Side by side:

* **naive** — the same shift x divisor search done the way the authors' reference code does
  it: an exact ``torch.linalg.svd`` TR-SVD per (shift, divisor), each recomputing its first
  SVD (no reuse, no Gram scoring). Run at ``--baseline-eps`` only (it is slow).
* **tensorly** — ``tensorly.decomposition.tensor_ring`` at the ranks and start mode RSDTR
  chose (one TR-SVD per layer, no search), to compare a single decomposition's cost.

Random kernels have flat spectra and compress badly: the report says how many layers' TR form
would be *larger* than the dense kernel (the planner keeps those dense) and gives PCR both with
every conv replaced and with that guard.

Run (writes benchmarks/results/tr_compress_time.{json,md})::

    nice .venv/bin/python benchmarks/bench_tr_compress_time.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import cpu_model  # benchmarks/common.py (the script's own folder)
from torch import nn

from tensorcut.decompose.tr import TRCandidate, rsdtr, tr_macs, tr_params, tr_svd, tr_to_tensor
from tensorcut.geometry import ConvGeometry

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- models


def _fallback_resnet(name: str) -> nn.Module:
    """Minimal CIFAR ResNet18 (basic blocks, 1x1 projection shortcuts) / ResNet20 (option A)."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, proj: bool) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.sc: nn.Module = nn.Identity()
            if stride != 1 or cin != cout:
                if proj:
                    self.sc = nn.Sequential(
                        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                    )
                else:
                    pad = cout - cin
                    self.sc = _PadShortcut(stride, pad)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.sc(x))

    class _PadShortcut(nn.Module):
        def __init__(self, stride: int, pad: int) -> None:
            super().__init__()
            self.stride, self.pad = stride, pad

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x[:, :, :: self.stride, :: self.stride]
            return nn.functional.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    if name == "resnet18":
        widths, blocks, proj, stem = (64, 128, 256, 512), (2, 2, 2, 2), True, 64
    elif name == "resnet20":
        widths, blocks, proj, stem = (16, 32, 64), (3, 3, 3), False, 16
    else:
        raise SystemExit(f"no fallback builder for {name}")
    layers: list[nn.Module] = [
        nn.Conv2d(3, stem, 3, 1, 1, bias=False),
        nn.BatchNorm2d(stem),
        nn.ReLU(),
    ]
    cin = stem
    for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
        for j in range(n):
            layers.append(Block(cin, w, 2 if (j == 0 and i > 0) else 1, proj))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def build(name: str) -> tuple[nn.Module, str]:
    """The model from ``tensorcut.models`` if importable, else the local fallback."""
    try:
        from tensorcut.models import create
    except ImportError:
        return _fallback_resnet(name), "local fallback builder"
    return create(name), "tensorcut.models.create"


def conv_inputs(model: nn.Module, hw: int = 32) -> list[tuple[str, nn.Conv2d, tuple[int, int]]]:
    """Every Conv2d with the spatial size of its input at ``hw`` x ``hw``."""
    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(
                m.register_forward_hook(
                    lambda mod, i, o, n=name: sizes.__setitem__(n, tuple(i[0].shape[-2:]))
                )
            )
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, hw, hw))
    for h in handles:
        h.remove()
    return [(n, m, sizes[n]) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


# ----------------------------------------------------------------------------- searches


def _key(c: TRCandidate) -> tuple[float, float, int, int]:
    return (float(c.params), round(c.rel_error, 9), c.shift, c.divisor)


def naive_search(kernel: torch.Tensor, eps: float) -> TRCandidate:
    """Exact-SVD TR-SVD for every (shift, divisor), each from scratch (as the reference code)."""
    shape = tuple(kernel.shape)
    cands = []
    for s in range(4):
        first = tr_svd(kernel, eps, shift=s, solver="svd")
        big_r = first.ranks[s] * first.ranks[(s + 1) % 4]
        for dv in [d for d in range(1, big_r + 1) if big_r % d == 0]:
            res = first if dv == 1 else tr_svd(kernel, eps, shift=s, divisor=dv, solver="svd")
            cands.append(
                TRCandidate(s, dv, res.ranks, tr_params(shape, res.ranks), None, res.rel_error)
            )
    return min(cands, key=_key)


def tensorly_at(kernel: torch.Tensor, ranks: tuple[int, ...], shift: int) -> tuple[float, float]:
    """(seconds, relative error) of tensorly's TR-SVD at fixed ranks starting at mode ``shift``."""
    import tensorly as tl
    from tensorly.decomposition import tensor_ring

    tl.set_backend("numpy")
    x = kernel.detach().double().numpy()
    try:  # one BLAS thread, like rsdtr on these kernels (see the report's note)
        from threadpoolctl import threadpool_limits

        limit: Any = threadpool_limits(limits=1)
    except ImportError:
        limit = None
    try:
        t0 = time.perf_counter()
        tr = tensor_ring(x, rank=[*ranks, ranks[0]], mode=shift)
        dt = time.perf_counter() - t0
    finally:
        if limit is not None:
            limit.restore_original_limits()
    # tensorly's own tr_to_tensor is far slower than the decomposition at these ranks
    rec = tr_to_tensor([torch.from_numpy(f) for f in tr.factors])
    xt = torch.from_numpy(x)
    return dt, float((rec - xt).norm() / xt.norm())


# ----------------------------------------------------------------------------- main


def run_model(
    name: str, eps_list: list[float], baseline_eps: list[float], do_tensorly: bool, seed: int
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model, source = build(name)
    convs = conv_inputs(model)
    total_params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {
        "model": name,
        "builder": source,
        "model_params": total_params,
        "n_convs": len(convs),
        "runs": [],
    }
    for eps in eps_list:
        layers = []
        for lname, conv, hw in convs:
            geom = ConvGeometry.from_conv(conv)
            w = conv.weight.detach()
            t0 = time.perf_counter()
            res = rsdtr(w, eps)
            dt = time.perf_counter() - t0
            dense = w.numel()
            row: dict[str, Any] = {
                "name": lname,
                "shape": list(w.shape),
                "input_hw": list(hw),
                "seconds": dt,
                "ranks": list(res.ranks),
                "shift": res.shift,
                "divisor": res.divisor,
                "candidates": len(res.search),
                "rel_error": res.rel_error,
                "dense_params": dense,
                "tr_params": res.params,
                "dense_macs": geom.dense_macs(hw),
                "tr_macs": tr_macs(
                    tuple(w.shape),
                    res.ranks,
                    hw,
                    stride=geom.stride,
                    padding=geom.pad,
                    dilation=geom.dilation,
                ),
            }
            if eps in baseline_eps:
                t0 = time.perf_counter()
                nv = naive_search(w, eps)
                row["naive_seconds"] = time.perf_counter() - t0
                row["naive_params"] = nv.params
            if do_tensorly and eps in baseline_eps:
                row["tensorly_seconds"], row["tensorly_rel_error"] = tensorly_at(
                    w, res.ranks, res.shift
                )
            layers.append(row)
            print(
                f"  {name} eps={eps} {lname:24s} {str(tuple(w.shape)):18s} {dt:7.2f}s "
                f"ranks={res.ranks} P {dense}->{res.params}"
                + (f" naive {row['naive_seconds']:.2f}s" if "naive_seconds" in row else ""),
                flush=True,
            )
        total = sum(r["seconds"] for r in layers)
        dense_p = sum(r["dense_params"] for r in layers)
        tr_all = sum(r["tr_params"] for r in layers)
        guarded = sum(min(r["tr_params"], r["dense_params"]) for r in layers)
        dense_m = sum(r["dense_macs"] for r in layers)
        guarded_m = sum(
            r["tr_macs"] if r["tr_params"] < r["dense_params"] else r["dense_macs"] for r in layers
        )
        run: dict[str, Any] = {
            "eps": eps,
            "rsdtr_seconds": total,
            "max_rel_error": max(r["rel_error"] for r in layers),
            "conv_params_dense": dense_p,
            "conv_params_tr_all": tr_all,
            "conv_params_guarded": guarded,
            "pcr_conv_all": dense_p / tr_all,
            "pcr_conv_guarded": dense_p / guarded,
            "pcr_model_guarded": total_params / (total_params - dense_p + guarded),
            "fcr_conv_guarded": dense_m / guarded_m,
            "layers_larger_than_dense": sum(r["tr_params"] >= r["dense_params"] for r in layers),
            "layers": layers,
        }
        if eps in baseline_eps:
            run["naive_seconds"] = sum(r["naive_seconds"] for r in layers)
            run["naive_same_params"] = sum(r["naive_params"] == r["tr_params"] for r in layers)
            if do_tensorly:
                run["tensorly_seconds"] = sum(r["tensorly_seconds"] for r in layers)
        out["runs"].append(run)
    return out


def write_markdown(report: dict[str, Any], path: Path) -> None:
    env = report["environment"]
    lines = [
        "# RSDTR compression time (randomly initialised CIFAR ResNets)",
        "",
        f"Device: {env['cpu']}, {env['threads']} torch thread(s) on {env['cores']} cores; torch "
        f"{env['torch']}; tensorly {env['tensorly']}; load average {env['loadavg_start']} at "
        f"start, {env['loadavg_end']} at end (the machine is shared; times are wall clock).",
        "",
        env["threads_note"],
        "",
        f"Command: `{env['command']}`",
        "",
        "Objective: fewest stored parameters. PCR = dense conv parameters / compressed; *all* "
        "replaces every conv, *guarded* keeps a layer dense when its ring would not be smaller "
        "(what the planner does). FCR = conv MACs at 32x32, guarded. Random kernels have flat "
        "spectra, so PCR is low by nature.",
        "",
        "| model | eps | RSDTR s | naive exact-SVD s | speed-up | tensorly TR-SVD at chosen ranks "
        "s | layers | larger than dense | PCR all | PCR guarded | PCR whole model | FCR guarded | "
        "max rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        for r in m["runs"]:
            naive = f"{r['naive_seconds']:.1f}" if "naive_seconds" in r else "—"
            speed = (
                f"{r['naive_seconds'] / r['rsdtr_seconds']:.1f}x" if "naive_seconds" in r else "—"
            )
            tly = f"{r['tensorly_seconds']:.1f}" if "tensorly_seconds" in r else "—"
            lines.append(
                f"| {m['model']} | {r['eps']} | {r['rsdtr_seconds']:.1f} | {naive} | {speed} | "
                f"{tly} | {m['n_convs']} | {r['layers_larger_than_dense']} | "
                f"{r['pcr_conv_all']:.3f} | {r['pcr_conv_guarded']:.3f} | "
                f"{r['pcr_model_guarded']:.3f} | {r['fcr_conv_guarded']:.3f} | "
                f"{r['max_rel_error']:.3f} |"
            )
    lines += ["", "Naive and RSDTR choose rings of equal size on every layer where both ran:"]
    for m in report["models"]:
        for r in m["runs"]:
            if "naive_same_params" in r:
                lines.append(
                    f"- {m['model']} eps {r['eps']}: {r['naive_same_params']}/{m['n_convs']} layers"
                )
    big = next((m for m in report["models"] if m["model"] == "resnet18"), None)
    if big is not None:
        r = next((x for x in big["runs"] if "naive_seconds" in x), big["runs"][0])
        lines += [
            "",
            f"## Per layer: resnet18, eps {r['eps']}",
            "",
            "| layer | kernel | s | naive s | ranks (a,b,c,d) | shift | divisor | candidates | "
            "dense P | TR P | rel. err |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["layers"]:
            nv = f"{row['naive_seconds']:.2f}" if "naive_seconds" in row else "—"
            lines.append(
                f"| {row['name']} | {'x'.join(map(str, row['shape']))} | {row['seconds']:.2f} | "
                f"{nv} | {tuple(row['ranks'])} | {row['shift']} | {row['divisor']} | "
                f"{row['candidates']} | {row['dense_params']} | {row['tr_params']} | "
                f"{row['rel_error']:.3f} |"
            )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet20"])
    ap.add_argument("--eps", nargs="+", type=float, default=[0.5, 0.3, 0.7])
    ap.add_argument(
        "--baseline-eps",
        nargs="*",
        type=float,
        default=[0.5],
        help="eps values that also run naive + tensorly",
    )
    ap.add_argument("--no-tensorly", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "tr_compress_time")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        import tensorly

        tly_version = tensorly.__version__
    except ImportError:
        tly_version = "not installed"
    do_tly = not args.no_tensorly and tly_version != "not installed"
    env = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tensorly": tly_version,
        "python": platform.python_version(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "command": "nice .venv/bin/python " + " ".join(sys.argv),
        "threads_note": "tensorcut's TR-SVD/RSDTR run single-threaded on kernels of at most 2**22 "
        "entries (every kernel here), whatever torch's thread count: threaded BLAS stalls on a "
        "busy shared CPU (ResNet-18 at eps 0.5 took 220 s with two threads vs 26 s with one while "
        "developing this). The naive baseline goes through the same code path; tensorly's "
        "numpy/OpenBLAS is limited to one thread as well.",
    }
    models = [run_model(m, args.eps, args.baseline_eps, do_tly, args.seed) for m in args.models]
    env["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report = {"environment": env, "models": models}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.out.with_suffix(".json"))
    write_markdown(report, args.out.with_suffix(".md"))
    for m in models:
        for r in m["runs"]:
            extra = f", naive {r['naive_seconds']:.1f}s" if "naive_seconds" in r else ""
            print(
                f"{m['model']} eps={r['eps']}: rsdtr {r['rsdtr_seconds']:.1f}s{extra}; PCR all "
                f"{r['pcr_conv_all']:.3f}, guarded {r['pcr_conv_guarded']:.3f}; "
                f"{r['layers_larger_than_dense']}/{m['n_convs']} layers larger than dense"
            )


if __name__ == "__main__":
    main()
