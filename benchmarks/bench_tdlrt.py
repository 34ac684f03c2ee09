"""Benchmark rank-adaptive Tucker training (TDLRT) against dense training.

Two suites:

``--suite parity`` (default): dense and TDLRT side by side, trained from the same seed with the
same recipe (optimiser, learning rate, schedule, batch, data split), over several seeds and
recipes; the mean, standard deviation and the paired difference (TDLRT - dense, per seed) of
test top-1, and the conv compression TDLRT reached. The data are loaded as ``tensorcut train``
loads them (``val_fraction`` held out of the training split for the plateau schedule, the full
test split). Results: ``benchmarks/results/tdlrt.json`` (rewritten after every run;
``--resume`` skips the runs it holds) and ``tdlrt.md``.

    nice -n 5 python benchmarks/bench_tdlrt.py --seeds 0,1,2,3,4

``--suite methods``: per model and ``tau``, TDLRT from scratch against dense, Tucker layers
fixed at TDLRT's final ranks, compress-then-fine-tune and pretrained->TDLRT, with interleaved
step timings (``benchmarks/results/tdlrt_methods.*``):

* ``dense``       -- the uncompressed network, plain training;
* ``tdlrt``       -- TDLRT from scratch (random orthonormal Tucker start, ``ceil(n/2)`` ranks);
* ``fixed``       -- Tucker layers fixed at TDLRT's *final* ranks, random start, all factors
                     trained by plain backprop with the same optimiser and schedule;
* ``compress_ft`` -- the trained dense model compressed by HOSVD to the same ranks, then
                     fine-tuned with the plain optimiser (compress-then-fine-tune);
* ``tdlrt_pre``   -- the trained dense model, HOSVD at full rank, then TDLRT (the second entry
                     point).

Everything uses the same optimiser (SGD, momentum 0.9, no Nesterov), learning rate, cosine
schedule and batch size. Accuracy is on a held-out test subset; compression counts conv
layers only (all convolutions, biases included; the first conv stays dense), as
``100 (1 - stored / dense)`` (the paper's "compression rate") and as the ratio dense / stored.
Seconds per epoch are training time only (no evaluation), on whatever CPU is free -- on a
shared machine they are noisy; the ratio to dense is what to read.

    nice python benchmarks/bench_tdlrt.py --suite methods --models vgg11,resnet20,vgg16
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorcut import data as tdata
from tensorcut import models
from tensorcut.train.loop import evaluate
from tensorcut.train.tdlrt import TDLRTOptimizer, rank_report, train_tdlrt, tuckerize

RESULTS = Path(__file__).resolve().parent / "results"


def plain_train(
    model: nn.Module, loader: Any, epochs: int, lr: float, momentum: float
) -> list[float]:
    """SGD (momentum, no Nesterov) with a per-step cosine schedule; returns seconds per epoch."""
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    secs = []
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        secs.append(time.perf_counter() - t0)
    model.eval()
    return secs


def conv_stats(model: nn.Module) -> dict[str, Any]:
    rep = rank_report(model)
    return {
        "conv_params": rep["conv_params"],
        "conv_dense_params": rep["conv_dense_params"],
        "conv_cr": round(rep["conv_cr"], 3),
        "conv_compression_pct": round(rep["conv_compression_pct"], 2),
        "ranks": {k: v["ranks"] for k, v in rep["layers"].items()},
    }


def record(results: dict[str, Any], row: dict[str, Any], out: Path) -> None:
    results["runs"].append(row)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    acc = row.get("test_top1")
    print(
        f"  {row['model']:>9} {row['method']:<12} tau={row.get('tau', '-')!s:<5} top1={acc:.4f} "
        f"conv-compression={row['conv_compression_pct']:.1f}% "
        f"s/epoch={row.get('sec_per_epoch', 0):.1f}",
        flush=True,
    )


def step_timing(
    fresh: Any,
    name: str,
    finals: dict[float, dict[str, tuple[int, int]]],
    batch: tuple[torch.Tensor, torch.Tensor],
    reps: int,
    lr: float,
    momentum: float,
) -> dict[str, float]:
    """Median seconds per training step, methods interleaved round-robin so CPU contention hits all
    alike.

    ``dense``: plain SGD step; ``tdlrt@tau``: a full TDLRT step (2 forward + 2 backward,
    augmentation, truncation) on Tucker layers started at that run's final ranks; ``fixed@tau``:
    plain SGD step on Tucker layers fixed at those ranks.
    """
    x, y = batch
    steps: dict[str, Any] = {}
    dense = fresh(name)
    dopt = torch.optim.SGD(dense.parameters(), lr=lr, momentum=momentum)

    def plain_step(m: nn.Module, o: torch.optim.Optimizer) -> Any:
        def run() -> None:
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            o.step()

        return run

    steps["dense"] = plain_step(dense, dopt)
    for tau, ranks in finals.items():
        m = tuckerize(fresh(name), ranks, from_pretrained=False, rmin=1)
        opt = TDLRTOptimizer(m, tau, lr=lr, momentum=momentum)

        def tstep(m: nn.Module = m, opt: TDLRTOptimizer = opt) -> None:
            def closure() -> torch.Tensor:
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                return loss

            opt.step(closure)

        steps[f"tdlrt@{tau}"] = tstep
        f = tuckerize(fresh(name), ranks, from_pretrained=False, rmin=1)
        steps[f"fixed@{tau}"] = plain_step(
            f, torch.optim.SGD(f.parameters(), lr=lr, momentum=momentum)
        )
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(reps + 2):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            if rep >= 2:  # two warm-up rounds
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        "# TDLRT benchmark",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Data: {cfg['dataset']}, {cfg['subset']} training images (seeded subset, 10% of the "
        f"training split held out unused), {cfg['test_subset']} test images; width multipliers "
        f"{cfg.get('widths', cfg.get('width'))}; {cfg['epochs']} epochs; SGD lr {cfg['lr']} "
        f"momentum {cfg['momentum']}, cosine schedule, batch {cfg['batch_size']}; "
        f"compress-then-fine-tune and pretrained->TDLRT: {cfg['ft_epochs']} epochs at lr "
        f"{cfg['ft_lr']}. rmin {cfg['rmin']}. CPU threads {cfg['threads']} ({results['machine']}).",
        "",
        "Compression = 100 (1 - stored / dense) over all conv layers (biases included, first conv "
        "dense); CR = dense / stored. Time = training seconds per epoch, and relative to dense.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["model"] == model]
        dense = next((r for r in runs if r["method"] == "dense"), None)
        lines += [
            f"## {model}",
            "",
            "| method | tau | test top-1 | conv compression % | conv CR | s/epoch | time vs dense "
            "| final ranks (r_out, r_in) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            rel = (
                f"{r['sec_per_epoch'] / dense['sec_per_epoch']:.2f}x"
                if dense and r.get("sec_per_epoch") and r["method"] != "compress_ft"
                else "-"
            )
            ranks = " ".join(f"{a}/{b}" for a, b in r.get("ranks", {}).values()) or "-"
            lines.append(
                f"| {r['method']} | {r.get('tau', '-')} | {r['test_top1']:.4f} | "
                f"{r['conv_compression_pct']:.1f} | {r['conv_cr']:.2f} | "
                f"{r.get('sec_per_epoch', 0):.1f} | {rel} | {ranks} |"
            )
        lines.append("")
        timing = results.get("step_timing", {}).get(model)
        if timing:
            base = timing["dense"]
            lines += [
                "Median seconds per training step (batch of "
                f"{cfg['batch_size']}"
                ", methods interleaved; "
                "more robust than the per-epoch times on a shared CPU):",
                "",
                "| step | seconds | vs dense |",
                "|---|---|---|",
            ]
            lines += [f"| {k} | {v:.3f} | {v / base:.2f}x |" for k, v in timing.items()]
            lines.append("")
    lines += results.get("notes", [])
    return "\n".join(lines) + "\n"


def methods_main(argv: list[str]) -> None:
    """The ``--suite methods`` benchmark."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="vgg11,resnet20,vgg16")
    ap.add_argument(
        "--widths",
        default="vgg11=0.25,vgg16=0.25,resnet20=0.5",
        help="channel width multiplier per model (others: 0.25)",
    )
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--subset", type=int, default=4000)
    ap.add_argument("--test-subset", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--taus", default="0.08,0.15,0.25,0.4")
    ap.add_argument("--rmin", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of methods to leave out (tdlrt_pre, compress_ft, fixed)",
    )
    ap.add_argument(
        "--timing-reps",
        type=int,
        default=15,
        help="interleaved steps per method for the step timing (0: none)",
    )
    ap.add_argument(
        "--timing-only",
        action="store_true",
        help="only (re)measure step times, for the final ranks already in the results JSON",
    )
    ap.add_argument("--out", default=str(RESULTS / "tdlrt_methods"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    taus = [float(t) for t in args.taus.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = tdata.dataset_info(args.dataset)
    tr = tdata.load_dataset(
        args.dataset, "train", data_dir=args.data_dir, seed=args.seed, subset=args.subset
    )
    te = tdata.load_dataset(
        args.dataset, "test", data_dir=args.data_dir, seed=args.seed, subset=args.test_subset
    )
    test_loader = tdata.make_loader(te, 500)

    def loader() -> Any:
        return tdata.make_loader(tr, args.batch_size, shuffle=True, seed=args.seed)

    widths = {k: float(v) for k, v in (kv.split("=") for kv in args.widths.split(",") if kv)}

    def fresh(name: str) -> nn.Module:
        torch.manual_seed(args.seed)
        return models.create(
            name,
            num_classes=info.num_classes,
            in_channels=info.in_channels,
            width=widths.get(name, 0.25),
            input_size=info.image_size,
        )

    def test(model: nn.Module) -> float:
        return evaluate(model, test_loader, "cpu")["top1"]

    def timing(name: str) -> None:
        finals = {
            r["tau"]: {k: tuple(v) for k, v in r["ranks"].items()}
            for r in results["runs"]
            if r["model"] == name and r["method"] == "tdlrt"
        }
        x, y = next(iter(loader()))
        t = step_timing(fresh, name, finals, (x, y), args.timing_reps, args.lr, args.momentum)
        results.setdefault("step_timing", {})[name] = t
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(markdown(results))
        print(
            f"  {name} step timing: " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items()), flush=True
        )

    if args.timing_only:
        results = json.loads(out.with_suffix(".json").read_text())
        results["config"]["timing_reps"] = args.timing_reps
        for name in args.models.split(","):
            timing(name)
        return
    flags = {
        k: v
        for k, v in vars(args).items()
        if k not in ("out", "timing_only") and v not in ("", None)
    }
    cmd = "nice python benchmarks/bench_tdlrt.py --suite methods " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in flags.items()
    )
    results = {
        "command": cmd,
        "config": vars(args),
        "runs": [],
        "machine": f"{platform.machine()}, torch {torch.__version__}",
    }
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        dense = fresh(name)
        secs = plain_train(dense, loader(), args.epochs, args.lr, args.momentum)
        record(
            results,
            {
                "model": name,
                "method": "dense",
                "test_top1": test(dense),
                "sec_per_epoch": sum(secs) / len(secs),
                **conv_stats(dense),
            },
            out,
        )
        for tau in taus:
            net = fresh(name)
            hist = train_tdlrt(
                net,
                loader(),
                None,
                tau=tau,
                rmin=args.rmin,
                epochs=args.epochs,
                optimizer="sgd",
                lr=args.lr,
                momentum=args.momentum,
                scheduler="cosine",
                from_pretrained=False,
                device="cpu",
            )
            final = {k: tuple(v) for k, v in hist[-1]["ranks"].items()}
            record(
                results,
                {
                    "model": name,
                    "method": "tdlrt",
                    "tau": tau,
                    "test_top1": test(net),
                    "sec_per_epoch": sum(h["seconds"] for h in hist) / len(hist),
                    "ranks_per_epoch": [h["ranks"] for h in hist],
                    **conv_stats(net),
                },
                out,
            )
            if "fixed" not in skip:
                net = tuckerize(fresh(name), final, from_pretrained=False, rmin=1)
                secs = plain_train(net, loader(), args.epochs, args.lr, args.momentum)
                record(
                    results,
                    {
                        "model": name,
                        "method": "fixed",
                        "tau": tau,
                        "test_top1": test(net),
                        "sec_per_epoch": sum(secs) / len(secs),
                        **conv_stats(net),
                    },
                    out,
                )
            if "compress_ft" not in skip:
                net = tuckerize(copy.deepcopy(dense), final, from_pretrained=True, rmin=1)
                before = test(net)
                secs = plain_train(net, loader(), args.ft_epochs, args.ft_lr, args.momentum)
                record(
                    results,
                    {
                        "model": name,
                        "method": "compress_ft",
                        "tau": tau,
                        "test_top1": test(net),
                        "top1_before_ft": before,
                        "sec_per_epoch": sum(secs) / max(len(secs), 1),
                        **conv_stats(net),
                    },
                    out,
                )
            if "tdlrt_pre" not in skip:
                net = copy.deepcopy(dense)
                hist = train_tdlrt(
                    net,
                    loader(),
                    None,
                    tau=tau,
                    rmin=args.rmin,
                    epochs=args.ft_epochs,
                    optimizer="sgd",
                    lr=args.ft_lr,
                    momentum=args.momentum,
                    scheduler="cosine",
                    from_pretrained=True,
                    device="cpu",
                )
                record(
                    results,
                    {
                        "model": name,
                        "method": "tdlrt_pre",
                        "tau": tau,
                        "test_top1": test(net),
                        "sec_per_epoch": sum(h["seconds"] for h in hist) / len(hist),
                        **conv_stats(net),
                    },
                    out,
                )
        if args.timing_reps > 0:
            timing(name)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


# -- parity suite: dense and TDLRT side by side, several seeds and recipes -------------------


def parse_recipe(text: str) -> dict[str, Any]:
    """``optimizer:lr:scheduler`` (e.g. ``adam:1e-3:plateau``) as FitConfig fields."""
    parts = text.split(":")
    if len(parts) != 3:
        raise SystemExit(f"a recipe is optimizer:lr:scheduler, got {text!r}")
    return {"optimizer": parts[0], "lr": float(parts[1]), "scheduler": parts[2]}


def parity_run(
    args: argparse.Namespace, model: str, recipe: str, method: str, seed: int
) -> dict[str, Any]:
    """One training run from ``seed`` (data split, shuffling and initial weights), tested."""
    from tensorcut.train.api import model_kwargs_for
    from tensorcut.train.config import FitConfig
    from tensorcut.train.loop import fit, set_seed

    split = {"data_dir": args.data_dir, "val_fraction": args.val_fraction, "seed": seed}
    tr = tdata.load_dataset(args.dataset, "train", subset=args.subset, **split)
    va = tdata.load_dataset(args.dataset, "val", **split)
    te = tdata.load_dataset(args.dataset, "test", **split)
    train = tdata.make_loader(tr, args.batch_size, shuffle=True, seed=seed)
    val = tdata.make_loader(va, 512)
    set_seed(seed)  # the initial weights, as `tensorcut train` draws them
    net = models.create(model, **model_kwargs_for(args.dataset, args.widths.get(model, 0.25)))
    rec = parse_recipe(recipe)
    t0 = time.perf_counter()
    if method == "dense":
        cfg = FitConfig(epochs=args.epochs, momentum=args.momentum, seed=seed, **rec)
        hist = fit(net, train, val, cfg, device="cpu", progress=False, distributed=False)
    else:
        hist = train_tdlrt(
            net, train, val, tau=args.tau, rmin=args.rmin, epochs=args.epochs,
            momentum=args.momentum, from_pretrained=False, device="cpu", seed=seed,
            progress=False, distributed=False, **rec,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    early = hist[min(args.early_epoch, len(hist)) - 1] if hist else {}
    return {
        "model": model,
        "recipe": recipe,
        "method": method,
        "seed": seed,
        "test_top1": evaluate(net, tdata.make_loader(te, 512), "cpu")["top1"],
        f"val_top1_epoch{args.early_epoch}": early.get("val_top1"),
        "train_seconds": seconds,
        **conv_stats(net),
    }


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def parity_summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (model, recipe): dense and TDLRT mean / std, the paired difference, compression."""
    out = []
    runs = results["runs"]
    early = f"val_top1_epoch{results['config']['early_epoch']}"
    for model, recipe in dict.fromkeys((r["model"], r["recipe"]) for r in runs):
        by = {
            m: {
                r["seed"]: r
                for r in runs
                if (r["model"], r["recipe"], r["method"]) == (model, recipe, m)
            }
            for m in ("dense", "tdlrt")
        }
        row: dict[str, Any] = {"model": model, "recipe": recipe}
        for m, rs in by.items():
            if rs:
                acc = [r["test_top1"] for r in rs.values()]
                row[m] = {
                    "n": len(acc),
                    "mean": _mean_std(acc)[0],
                    "std": _mean_std(acc)[1],
                    "early_mean": statistics.mean(
                        r[early] for r in rs.values() if r[early] is not None
                    ),
                    "conv_compression_pct": statistics.mean(
                        r["conv_compression_pct"] for r in rs.values()
                    ),
                    "seconds": statistics.mean(r["train_seconds"] for r in rs.values()),
                }
        both = sorted(set(by["dense"]) & set(by["tdlrt"]))
        if both:
            d = [by["tdlrt"][s]["test_top1"] - by["dense"][s]["test_top1"] for s in both]
            mean, std = _mean_std(d)
            row["paired_diff"] = {"n": len(d), "mean": mean, "std": std,
                                  "se": std / len(d) ** 0.5}  # fmt: skip
        out.append(row)
    return out


def parity_markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    e = cfg["early_epoch"]
    lines = [
        "# TDLRT against dense training",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}; {cfg['threads']} CPU thread(s) per run, shared machine. "
        f"Seeds {cfg['seeds']} (each: data split, shuffling, initial weights; dense and TDLRT of "
        "one seed start from the same draw). Data: "
        f"{cfg['dataset']} (`val_fraction` {cfg['val_fraction']} of the training split held out "
        f"for the plateau schedule; subset {cfg['subset']}; the full test split), batch "
        f"{cfg['batch_size']}, {cfg['epochs']} epochs, momentum {cfg['momentum']} (SGD). TDLRT: "
        f"from scratch (random orthonormal factors, half rank per mode), tau {cfg['tau']}, rmin "
        f"{cfg['rmin']}. Recipe = optimizer:lr:scheduler, the same for both arms.",
        "",
        "Top-1 on the test split, mean ± sample standard deviation over the seeds; diff = TDLRT - "
        "dense per seed (mean ± std, and its standard error); compression = 100 (1 - stored / "
        "dense) over all conv layers (first conv dense, biases included), the paper's compression "
        f"rate; val@{e} = validation top-1 after epoch {e}; seconds = training time of a run.",
        "",
        f"| model | recipe | dense top-1 | TDLRT top-1 | diff (SE) | TDLRT conv compression % "
        f"| dense / TDLRT val@{e} | dense / TDLRT s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in parity_summary(results):
        d, t, p = row.get("dense"), row.get("tdlrt"), row.get("paired_diff")
        if not (d and t and p):
            continue
        lines.append(
            f"| {row['model']} | {row['recipe']} | {d['mean']:.4f} ± {d['std']:.4f} | "
            f"{t['mean']:.4f} ± {t['std']:.4f} | {100 * p['mean']:+.2f} ± {100 * p['std']:.2f} pt "
            f"({100 * p['se']:.2f}) | {t['conv_compression_pct']:.1f} | "
            f"{d['early_mean']:.3f} / {t['early_mean']:.3f} | "
            f"{d['seconds']:.0f} / {t['seconds']:.0f} |"
        )
    lines.append("")
    lines += results.get("notes", [])
    return "\n".join(lines) + "\n"


def parity_main(argv: list[str]) -> None:
    """The ``--suite parity`` benchmark (see the module docstring)."""
    ap = argparse.ArgumentParser(description="TDLRT against dense, side by side over seeds")
    ap.add_argument("--models", default="vanilla-cnn")
    ap.add_argument("--widths", default="vanilla-cnn=0.25", help="width per model (others 0.25)")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument(
        "--recipes",
        default="adam:1e-3:plateau,adam:3e-3:plateau,sgd:0.05:cosine,sgd:0.1:cosine",
        help="comma list of optimizer:lr:scheduler, each run by both arms",
    )
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--rmin", type=int, default=2)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--early-epoch", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    ap.add_argument("--out", default=str(RESULTS / "tdlrt"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    raw_widths = args.widths
    args.widths = {k: float(v) for k, v in (kv.split("=") for kv in raw_widths.split(",") if kv)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "widths")}
    shown["widths"] = raw_widths
    cmd = "nice -n 5 python benchmarks/bench_tdlrt.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in shown.items() if v is not None
    )
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.processor() or platform.machine(),
    ) if Path("/proc/cpuinfo").exists() else platform.machine()  # fmt: skip
    results: dict[str, Any] = {
        "command": cmd,
        "config": shown,
        "machine": f"{cpu}, torch {torch.__version__}",
        "runs": [],
    }
    if args.resume and out.with_suffix(".json").exists():
        kept = json.loads(out.with_suffix(".json").read_text())
        results["runs"] = kept["runs"]
        results.update({k: kept[k] for k in ("notes", "before_fix") if k in kept})
    done = {(r["model"], r["recipe"], r["method"], r["seed"]) for r in results["runs"]}
    for model in args.models.split(","):
        for recipe in args.recipes.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                for method in ("dense", "tdlrt"):
                    if (model, recipe, method, seed) in done:
                        continue
                    row = parity_run(args, model, recipe, method, seed)
                    results["runs"].append(row)
                    results["summary"] = parity_summary(results)
                    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
                    out.with_suffix(".md").write_text(parity_markdown(results))
                    print(
                        f"  {model} {recipe} {method:<5} seed {seed}: top1 "
                        f"{row['test_top1']:.4f} conv compression "
                        f"{row['conv_compression_pct']:.1f}% {row['train_seconds']:.0f}s",
                        flush=True,
                    )
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def main() -> None:
    argv = sys.argv[1:]
    suite = "parity"
    if "--suite" in argv:
        i = argv.index("--suite")
        suite = argv[i + 1] if i + 1 < len(argv) else ""
        argv = argv[:i] + argv[i + 2 :]
    if suite == "parity":
        parity_main(argv)
    elif suite == "methods":
        methods_main(argv)
    else:
        raise SystemExit(f"--suite is parity or methods, got {suite!r}")


if __name__ == "__main__":
    main()
