"""The thesis's result tables (Chapter 7), reproduced small on Fashion-MNIST, CPU only.

For ``vgg11`` and ``resnet18`` (CIFAR forms from ``tensorcut.models``, **width-reduced**: by default
VGG11 at width 0.25 (channels 16-32-64-128 instead of 64-128-256-512) and ResNet18 at width 0.125
(8-16-32-64; it costs ~3x VGG11's time per image at equal width)) on **Fashion-MNIST** (28 px, one
channel; seeded subsets of the training / validation / test splits, see ``--train-subset`` etc.),
methods CP / Tucker / TT x parameter retention 0.1 / 0.2 / 0.5 / 0.8 x the thesis's three
strategies:

1. **from scratch** (thesis 7.2.1): the factorized layers are built at the ranks the retention
   gives, randomly initialised (each sublayer as ``nn.Conv2d`` initialises), and the whole network
   is trained with the same recipe as the uncompressed baseline;
2. **pretrained, no fine-tuning** (7.2.2): the baseline, trained ``--pretrain-epochs`` epochs, is
   decomposed (``tensorcut.compression``, ``ratio=retention``) and evaluated as it is;
3. **pretrained + fine-tuning** (7.2.3): model 2 fine-tuned with the thesis's recipe
   (``tensorcut.train.recipes.FINETUNE_RECIPE``: Adam, lr 1e-5, early stopping on validation
   loss with
   patience 3) but capped at ``--ft-epochs`` epochs instead of 50.

Which layers: as in the thesis (Table 7.1), every 3x3 convolution except the first one (VGG11: 7
layers, ResNet18: 16); ResNet's 1x1 projection shortcuts stay dense. **Retention** is applied per
factorized layer (``ratio`` = the layer's kept fraction of parameters, as tensorly-torch's
fractional rank did in the thesis); the tables also give the achieved retention over *all* conv
layers (compressed conv params / dense conv params, the dense stem and shortcuts included).
#Parameters, model size (MB = params x 4 / 1e6, thesis Eq. 7.3) and compression ratio (dense /
compressed parameters, Eq. 7.2) are for the whole model. "Tucker" is tensorcut's Tucker-2 layer by
default (``--tucker-method``; the thesis's tensorly-torch Tucker also cut the spatial ranks).

The recipe (thesis 7.1.2, scaled down): Adam, lr 1e-3, batch 64 (thesis 128), constant learning
rate, for ``--epochs`` epochs over ``--train-subset`` training images (the thesis: 50 epochs over
45,000 CIFAR-10 images). Accuracy is top-1 on ``--test-subset`` test images (standard error about
sqrt(p(1-p)/n), ~0.011 at n=1000, p=0.85). The thesis's CIFAR-10 numbers (full-width networks, 50
epochs, GPU) are printed beside ours for reference only: data set, width and training length all
differ.

After each training or fine-tuning run the BatchNorm statistics are re-estimated over the
training subset (one forward pass; see ``reestimate_bn``). Models tensorized without fine-tuning
are evaluated as they are (thesis protocol) and, in an extra column, with re-estimated BN
statistics.

Resumable: every finished row is written to the JSON at once; a rerun with the same settings
skips finished rows (``--fresh`` starts over). The trained baseline is cached in ``--cache-dir``.

Run (writes benchmarks/results/thesis_tables.{json,md})::

    nice -n 10 .venv/bin/python benchmarks/bench_thesis_tables.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
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
    machine_info,
    md_table,
    pin_threads,
    uptime_line,  # noqa: E402
    write_json,
    write_markdown,
)
from torch import nn  # noqa: E402

# ------------------------------------------------------------------ the thesis's numbers (CIFAR-10)
# (params, size MB, compression ratio, accuracy) per (model, strategy, method, retention), copied
# from Tables 7.2 / 7.6 / 7.10 (ResNet18) and 7.4 / 7.8 / 7.12 (VGG11) of the thesis
# (shared/seeds/004_*).

THESIS_UNCOMPRESSED = {
    "resnet18": (11173962, 44.695, 1.0, 0.9043),
    "vgg11": (9231114, 36.924, 1.0, 0.8803),
}
THESIS_TABLE_NO = {
    ("resnet18", "scratch"): "7.2",
    ("resnet18", "pretrained"): "7.6",
    ("resnet18", "finetune"): "7.10",
    ("vgg11", "scratch"): "7.4",
    ("vgg11", "pretrained"): "7.8",
    ("vgg11", "finetune"): "7.12",
}
# params, MB, CR per method and retention (scratch; CP/Tucker the same after pretraining)
_R18_SIZE = {
    "cp": {
        0.1: (1288468, 5.153, 8.672),
        0.2: (2389079, 9.556, 4.677),
        0.5: (5687499, 22.749, 1.965),
        0.8: (8987725, 35.951, 1.243),
    },
    "tucker": {
        0.1: (1288513, 5.154, 8.672),
        0.2: (2387722, 9.551, 4.68),
        0.5: (5690166, 22.761, 1.964),
        0.8: (8983194, 35.932, 1.244),
    },
    "tt": {
        0.1: (1288398, 5.153, 8.673),
        0.2: (2384384, 9.556, 4.686),
        0.5: (5691839, 22.767, 1.963),
        0.8: (8965400, 35.861, 1.246),
    },
}
_R18_TT_PRE = {
    0.1: (723529, 2.894, 15.444),
    0.2: (1252568, 5.010, 8.921),
    0.5: (1592209, 6.369, 7.018),
    0.8: (1728997, 6.916, 6.463),
}
_V11_SIZE = {
    "cp": {
        0.1: (937456, 3.750, 9.847),
        0.2: (1860182, 7.441, 4.962),
        0.5: (4627272, 18.509, 1.995),
        0.8: (7394881, 29.580, 1.248),
    },
    "tucker": {
        0.1: (938922, 3.756, 9.832),
        0.2: (1858301, 7.433, 4.968),
        0.5: (4631515, 18.526, 1.993),
        0.8: (7395593, 29.582, 1.248),
    },
    "tt": {
        0.1: (938326, 3.753, 9.838),
        0.2: (1856280, 7.425, 4.973),
        0.5: (4630781, 18.523, 1.993),
        0.8: (7376404, 29.50, 1.251),
    },
}
_V11_TT_PRE = {
    0.1: (452943, 1.812, 20.380),
    0.2: (883615, 3.534, 10.447),
    0.5: (1137418, 4.550, 8.116),
    0.8: (1231198, 4.925, 7.498),
}
_ACC = {  # accuracy per retention 0.1, 0.2, 0.5, 0.8
    ("resnet18", "scratch", "cp"): (0.88, 0.8888, 0.8991, 0.8997),
    ("resnet18", "scratch", "tucker"): (0.8875, 0.8871, 0.9007, 0.9036),
    ("resnet18", "scratch", "tt"): (0.7907, 0.8067, 0.7906, 0.7968),
    ("resnet18", "pretrained", "cp"): (0.8066, 0.8807, 0.9017, 0.904),
    ("resnet18", "pretrained", "tucker"): (0.7742, 0.8436, 0.8915, 0.8992),
    ("resnet18", "pretrained", "tt"): (0.1002, 0.1776, 0.1565, 0.2874),
    ("resnet18", "finetune", "cp"): (0.897, 0.9203, 0.9189, 0.9148),
    ("resnet18", "finetune", "tucker"): (0.894, 0.9138, 0.9237, 0.9283),
    ("resnet18", "finetune", "tt"): (0.5416, 0.7227, 0.8328, 0.8675),
    ("vgg11", "scratch", "cp"): (0.8424, 0.8565, 0.8777, 0.8747),
    ("vgg11", "scratch", "tucker"): (0.8437, 0.8556, 0.8691, 0.8671),
    ("vgg11", "scratch", "tt"): (0.5102, 0.6694, 0.6916, 0.6757),
    ("vgg11", "pretrained", "cp"): (0.7367, 0.8562, 0.8829, 0.8855),
    ("vgg11", "pretrained", "tucker"): (0.704, 0.8419, 0.8778, 0.8822),
    ("vgg11", "pretrained", "tt"): (0.1, 0.1, 0.1123, 0.23),
    ("vgg11", "finetune", "cp"): (0.865, 0.8816, 0.8925, 0.8919),
    ("vgg11", "finetune", "tucker"): (0.8587, 0.8851, 0.8971, 0.8969),
    ("vgg11", "finetune", "tt"): (0.3675, 0.5445, 0.7679, 0.8032),
}
_RETS = (0.1, 0.2, 0.5, 0.8)


def thesis_ref(model: str, strategy: str, method: str, retention: float) -> dict[str, Any] | None:
    """The thesis's CIFAR-10 row for this cell (None where the thesis has no such cell)."""
    key = (model, strategy, method)
    if key not in _ACC or retention not in _RETS:
        return None
    size = _R18_SIZE if model == "resnet18" else _V11_SIZE
    tt_pre = _R18_TT_PRE if model == "resnet18" else _V11_TT_PRE
    p, mb, cr = (
        tt_pre[retention] if (method == "tt" and strategy != "scratch") else size[method][retention]
    )
    return {
        "params": p,
        "size_mb": mb,
        "compression_ratio": cr,
        "accuracy": _ACC[key][_RETS.index(retention)],
        "table": THESIS_TABLE_NO[(model, strategy)],
    }


# ----------------------------------------------------------------------------- helpers


def thesis_filter(name: str, module: nn.Module) -> bool:
    """Every 3x3 conv except the stem (the thesis kept the first conv dense; 1x1 shortcuts too)."""
    return (
        isinstance(module, nn.Conv2d)
        and tuple(module.kernel_size) == (3, 3)
        and module.in_channels > 3
    )


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_params(model: nn.Module) -> int:
    """Parameters of all convolutions, dense or factorized (with a factorized one's sublayers)."""
    from tensorcut.layers import FactorizedConv2d

    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, FactorizedConv2d):
            total += sum(p.numel() for p in m.parameters())
            seen.update(id(s) for s in m.modules())
        elif isinstance(m, nn.Conv2d) and id(m) not in seen:
            total += sum(p.numel() for p in m.parameters())
    return total


def cache_key(d: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


class Data:
    """Seeded subsets of Fashion-MNIST and their loaders."""

    def __init__(self, args: argparse.Namespace) -> None:
        from tensorcut import data

        self.data = data
        self.train = data.load_dataset(
            "fashion-mnist", "train", subset=args.train_subset, seed=args.seed
        )
        self.val = data.load_dataset("fashion-mnist", "val", subset=args.val_subset, seed=args.seed)
        self.test = data.load_dataset(
            "fashion-mnist", "test", subset=args.test_subset, seed=args.seed
        )
        self.batch, self.seed = args.batch, args.seed

    def train_loader(self) -> Any:
        return self.data.make_loader(self.train, self.batch, shuffle=True, seed=self.seed)

    def val_loader(self) -> Any:
        return self.data.make_loader(self.val, 500)

    def test_loader(self) -> Any:
        return self.data.make_loader(self.test, 500)


def reestimate_bn(model: nn.Module, d: Data) -> None:
    """Recompute every BatchNorm's running statistics as the exact average over the training subset.

    After only tens of Adam steps the running averages (momentum 0.1) lag behind the weights, and a
    network evaluated with them can fall to chance although it trains fine (e.g. VGG11 with CP
    layers from scratch: 0.13 test top-1 as is, 0.76 after this pass). One forward pass, no weight
    changes.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was = model.training
    model.train()
    with torch.no_grad():
        for x, _ in d.train_loader():
            model(x)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.train(was)
    model.eval()


def train(
    model: nn.Module,
    d: Data,
    epochs: int,
    lr: float,
    seed: int,
    val: bool = False,
    patience: int | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """``tensorcut.train.fit`` with the recipe, then BatchNorm statistics re-estimated.

    The re-estimation is :func:`reestimate_bn`.
    """
    from tensorcut.train import FitConfig, fit

    cfg = FitConfig(
        epochs=epochs, optimizer="adam", lr=lr, scheduler="none", patience=patience, seed=seed
    )
    t0 = time.perf_counter()
    hist = fit(
        model,
        d.train_loader(),
        d.val_loader() if val else None,
        cfg,
        device="cpu",
        progress=False,
        distributed=False,
    )
    reestimate_bn(model, d)
    return hist, time.perf_counter() - t0


def test_top1(model: nn.Module, d: Data) -> float:
    from tensorcut.train import evaluate

    return float(evaluate(model, d.test_loader(), "cpu", distributed=False)["top1"])


def scratch_model(
    name: str, args: argparse.Namespace, method: str, retention: float
) -> tuple[nn.Module, list[str]]:
    """A fresh network whose selected convs are factorized at ``retention``'s ranks, random init."""
    from tensorcut import models
    from tensorcut.compression.rank import ranks_for_ratio
    from tensorcut.geometry import ConvGeometry
    from tensorcut.layers import LAYER_REGISTRY
    from tensorcut.train.loop import set_seed

    set_seed(args.seed)
    model = models.create(
        name, num_classes=10, in_channels=1, width=args.width_of[name], input_size=28
    )
    cls = LAYER_REGISTRY[method]
    notes = []
    for lname, conv in [(n, m) for n, m in model.named_modules() if thesis_filter(n, m)]:
        geom = ConvGeometry.from_conv(conv)
        r = ranks_for_ratio(
            tuple(cls.max_ranks(geom)),
            lambda rr, g=geom: cls.predicted_params(g, rr),
            retention * geom.dense_params(),
        )
        if cls.predicted_params(geom, r) >= geom.dense_params():
            notes.append(f"{lname}: {method} form not smaller, kept dense")
            continue
        layer = cls(geom, r)
        layer.reset_parameters()
        model.set_submodule(lname, layer)
    return model, notes


def make_dense(
    name: str, args: argparse.Namespace, d: Data, epochs: int
) -> tuple[nn.Module, dict[str, Any]]:
    """An uncompressed network trained ``epochs`` epochs with the recipe (cached per settings)."""
    from tensorcut import models
    from tensorcut.train.loop import set_seed

    key = cache_key(
        {
            "model": name,
            "width": args.width_of[name],
            "epochs": epochs,
            "lr": args.lr,
            "batch": args.batch,
            "train_subset": args.train_subset,
            "seed": args.seed,
            "torch": torch.__version__,
            "bn": "re-estimated",
        }
    )
    path = args.cache_dir / f"dense_{name}_{key}.pt"
    set_seed(args.seed)
    model = models.create(
        name, num_classes=10, in_channels=1, width=args.width_of[name], input_size=28
    )
    if path.exists():
        blob = torch.load(path, weights_only=True)
        model.load_state_dict(blob["state"])
        return model.eval(), json.loads(blob["info"])
    hist, secs = train(model, d, epochs, args.lr, args.seed)
    info = {"train_seconds": round(secs, 1), "history": hist}
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state": model.state_dict(), "info": json.dumps(info)}, tmp)
    os.replace(tmp, path)
    return model.eval(), info


def compress_pretrained(
    dense: nn.Module, method: str, retention: float
) -> tuple[nn.Module, Any, float]:
    from tensorcut.compression import compress

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, plan = compress(
            copy.deepcopy(dense),
            method=method,
            ratio=retention,
            filter_fn=thesis_filter,
            input_shape=(1, 28, 28),
            progress=False,
        )
    return model.eval(), plan, time.perf_counter() - t0


# ----------------------------------------------------------------------------- rows


def row_for(
    model_name: str,
    strategy: str,
    method_label: str,
    retention: float | None,
    model: nn.Module,
    dense_params: int,
    dense_conv: int,
    top1: float,
    n_test: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    p = n_params(model)
    cp = conv_params(model)
    row = {
        "model": model_name,
        "strategy": strategy,
        "method": method_label,
        "retention": retention,
        "params": p,
        "size_mb": round(p * 4 / 1e6, 4),
        "compression_ratio": round(dense_params / p, 4),
        "conv_params": cp,
        "conv_retention": round(cp / dense_conv, 4),
        "top1": round(top1, 4),
        "test_n": n_test,
        "top1_stderr": round(math.sqrt(max(top1 * (1 - top1), 1e-12) / n_test), 4),
    }
    row.update(extra)
    if retention is not None:
        row["thesis"] = thesis_ref(model_name, strategy, method_label, retention)
    else:
        t = THESIS_UNCOMPRESSED[model_name]
        row["thesis"] = {
            "params": t[0],
            "size_mb": t[1],
            "compression_ratio": t[2],
            "accuracy": t[3],
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vgg11,resnet18")
    ap.add_argument(
        "--methods", default="cp,tucker,tt", help="thesis names; tucker -> --tucker-method"
    )
    ap.add_argument("--tucker-method", default="tucker2", choices=["tucker2", "tucker"])
    ap.add_argument("--retentions", default="0.1,0.2,0.5,0.8")
    ap.add_argument("--strategies", default="pretrained,finetune,scratch")
    ap.add_argument(
        "--widths",
        default="vgg11:0.25,resnet18:0.125",
        help="width multiplier per model (model:width, comma-separated)",
    )
    ap.add_argument(
        "--epochs",
        type=int,
        default=2,
        help="training epochs of the from-scratch models and of the uncompressed row of their "
        "table",
    )
    ap.add_argument(
        "--pretrain-epochs",
        type=int,
        default=6,
        help="training epochs of the pretrained baseline that strategies 2 and 3 decompose",
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--batch",
        type=int,
        default=64,
        help="batch size (thesis: 128; smaller gives more steps here)",
    )
    ap.add_argument(
        "--ft-epochs",
        type=int,
        default=1,
        help="cap on the thesis's fine-tuning epochs (thesis: 50)",
    )
    ap.add_argument("--train-subset", type=int, default=1500)
    ap.add_argument("--val-subset", type=int, default=500)
    ap.add_argument("--test-subset", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "tensorcut_bench_cache",
    )
    ap.add_argument(
        "--fresh", action="store_true", help="ignore finished rows in an existing results file"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "thesis_tables")
    args = ap.parse_args()
    args.width_of = {k: float(v) for k, v in (kv.split(":") for kv in args.widths.split(","))}
    pin_threads(args.threads)
    warnings.simplefilter("ignore")
    from tensorcut.train.recipes import FINETUNE_RECIPE

    setting_keys = (
        "models",
        "methods",
        "tucker_method",
        "widths",
        "epochs",
        "pretrain_epochs",
        "lr",
        "batch",
        "ft_epochs",
        "train_subset",
        "val_subset",
        "test_subset",
        "seed",
    )
    settings = {k: getattr(args, k) for k in setting_keys}
    out_json = args.out.with_suffix(".json")
    machine = machine_info(args.threads)
    result: dict[str, Any] = {
        "command": command_line(),
        "machine": machine,
        "settings": settings,
        "rows": [],
        "runs": [],
    }
    if out_json.exists() and not args.fresh:
        old = json.loads(out_json.read_text())
        if {
            k: old.get("settings", {}).get(k)
            for k in setting_keys
            if k not in ("models", "methods")
        } == {k: v for k, v in settings.items() if k not in ("models", "methods")}:
            result["rows"] = old.get("rows", [])
            result["runs"] = old.get("runs", [])
            print(f"resuming: {len(result['rows'])} finished rows in {out_json}", flush=True)
    result["runs"].append(
        {
            "command": result["command"],
            "started": machine["started"],
            "uptime_at_start": machine["uptime_at_start"],
        }
    )
    done = {(r["model"], r["strategy"], r["method"], r["retention"]) for r in result["rows"]}
    d = Data(args)
    n_test = len(d.test)
    retentions = [float(r) for r in args.retentions.split(",")]
    strategies = args.strategies.split(",")
    t_all = time.perf_counter()

    def save(row: dict[str, Any] | None = None) -> None:
        if row is not None:
            result["rows"].append(row)
            done.add((row["model"], row["strategy"], row["method"], row["retention"]))
            print(
                f"  {row['model']} {row['strategy']:>10} {row['method']:>6} {row['retention']}: "
                f"params {row['params']:,} CR {row['compression_ratio']:.2f} top1 "
                f"{row['top1']:.4f}",
                flush=True,
            )
        result["runs"][-1]["load"] = mon.summary()
        result["runs"][-1]["seconds"] = round(time.perf_counter() - t_all, 1)
        result["runs"][-1]["uptime_last"] = uptime_line()
        write_json(out_json, result)

    with LoadMonitor() as mon:
        for mname in args.models.split(","):
            print(f"{mname}: baselines", flush=True)
            for strat, ep in (
                ("uncompressed-scratch", args.epochs),
                ("uncompressed", args.pretrain_epochs),
            ):
                if strat == "uncompressed-scratch" and "scratch" not in strategies:
                    continue
                dense, dinfo = make_dense(mname, args, d, ep)
                dp, dc = n_params(dense), conv_params(dense)
                if (mname, strat, "uncompressed", None) not in done:
                    top1 = test_top1(dense, d)
                    hist = dinfo.get("history", [])
                    save(
                        row_for(
                            mname,
                            strat,
                            "uncompressed",
                            None,
                            dense,
                            dp,
                            dc,
                            top1,
                            n_test,
                            {
                                "train_seconds": dinfo.get("train_seconds"),
                                "epochs": len(hist),
                                "final_train_top1": hist[-1]["train_top1"] if hist else None,
                            },
                        )
                    )
            for label in args.methods.split(","):
                method = args.tucker_method if label == "tucker" else label
                for ret in retentions:
                    need_pre = [
                        s
                        for s in ("pretrained", "finetune")
                        if s in strategies and (mname, s, label, ret) not in done
                    ]
                    if need_pre:
                        comp, plan, csecs = compress_pretrained(dense, method, ret)
                        tot = plan.totals()
                        errs = [
                            lp.error
                            for lp in plan.layers
                            if lp.status == "factorize" and lp.error is not None
                        ]
                        notes = [f"{lp.name}: {lp.note}" for lp in plan.layers if lp.note] + [
                            f"{lp.name}: dense ({lp.reason})"
                            for lp in plan.layers
                            if lp.status != "factorize"
                        ]
                        extra = {
                            "tensorcut_method": method,
                            "decompose_seconds": round(csecs, 1),
                            "factorized_layers": tot["factorized_layers"],
                            "mean_kernel_rel_error": round(sum(errs) / len(errs), 4)
                            if errs
                            else None,
                            "factorized_layer_retention": round(
                                sum(
                                    lp.params_after
                                    for lp in plan.layers
                                    if lp.status == "factorize"
                                )
                                / max(
                                    1,
                                    sum(
                                        lp.params_before
                                        for lp in plan.layers
                                        if lp.status == "factorize"
                                    ),
                                ),
                                4,
                            ),
                            "notes": notes,
                        }
                        if (
                            mname,
                            "pretrained",
                            label,
                            ret,
                        ) not in done and "pretrained" in strategies:
                            recal = copy.deepcopy(comp)
                            reestimate_bn(recal, d)
                            save(
                                row_for(
                                    mname,
                                    "pretrained",
                                    label,
                                    ret,
                                    comp,
                                    dp,
                                    dc,
                                    test_top1(comp, d),
                                    n_test,
                                    dict(extra, top1_bn_reestimated=round(test_top1(recal, d), 4)),
                                )
                            )
                        if (mname, "finetune", label, ret) not in done and "finetune" in strategies:
                            hist, secs = train(
                                comp,
                                d,
                                args.ft_epochs,
                                FINETUNE_RECIPE.lr,
                                args.seed,
                                val=True,
                                patience=FINETUNE_RECIPE.patience,
                            )
                            save(
                                row_for(
                                    mname,
                                    "finetune",
                                    label,
                                    ret,
                                    comp,
                                    dp,
                                    dc,
                                    test_top1(comp, d),
                                    n_test,
                                    dict(
                                        extra,
                                        ft_seconds=round(secs, 1),
                                        ft_epochs_run=len(hist),
                                        ft_lr=FINETUNE_RECIPE.lr,
                                        ft_val_loss=[round(h["val_loss"], 4) for h in hist],
                                    ),
                                )
                            )
                    if "scratch" in strategies and (mname, "scratch", label, ret) not in done:
                        model, notes = scratch_model(mname, args, method, ret)
                        hist, secs = train(model, d, args.epochs, args.lr, args.seed)
                        save(
                            row_for(
                                mname,
                                "scratch",
                                label,
                                ret,
                                model,
                                dp,
                                dc,
                                test_top1(model, d),
                                n_test,
                                {
                                    "tensorcut_method": method,
                                    "train_seconds": round(secs, 1),
                                    "epochs": len(hist),
                                    "final_train_top1": hist[-1]["train_top1"],
                                    "notes": notes,
                                },
                            )
                        )
        save()
    result["runs"][-1]["uptime_at_end"] = uptime_line()
    write_json(out_json, result)
    write_markdown(
        args.out.with_suffix(".md"),
        "The thesis's tables on Fashion-MNIST (width-reduced, CPU)",
        result["command"],
        render(result),
        machine,
        result["runs"][-1].get("load"),
    )
    print(f"wrote {out_json} and .md in {round(time.perf_counter() - t_all, 1)} s")


STRATEGY_TITLES = {
    "scratch": "tensorized from scratch (thesis 7.2.1)",
    "pretrained": "tensorized from a pretrained model, without fine-tuning (thesis 7.2.2)",
    "finetune": "after fine-tuning the tensorized pretrained model (thesis 7.2.3)",
}
METHOD_NAMES = {"uncompressed": "Uncompressed", "cp": "CP", "tucker": "Tucker", "tt": "TT"}


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    parts = [
        f"Fashion-MNIST (28x28, 1 channel): {s['train_subset']} training images, {s['val_subset']} "
        f"validation images (fine-tuning's early stopping), {s['test_subset']} test images "
        "(accuracy = top-1 on these; standard error ~0.01). Networks: CIFAR-form `vgg11` / "
        f"`resnet18`, **width-reduced** ({s['widths']}: every channel count times that factor). "
        f"Training: Adam lr {s['lr']}, batch {s['batch']}, constant lr; from-scratch models and "
        f"the uncompressed row of their table {s['epochs']} epochs, the pretrained baseline of the "
        f"other two tables {s['pretrain_epochs']} epochs (thesis: batch 128, 50 epochs over 45,000 "
        "CIFAR-10 images). Fine-tuning: the thesis recipe (Adam lr 1e-5, early stopping on "
        f"validation loss, patience 3) capped at {s['ft_epochs']} epochs (thesis: <= 50). "
        "Factorized: every 3x3 conv but the first (VGG11: 7, ResNet18: 16 layers, as in thesis "
        "Table 7.1); ResNet 1x1 shortcuts dense. `%Params` is the per-layer retention asked for; "
        "`conv ret.` the achieved compressed/dense parameters over **all** conv layers (stem and "
        "shortcuts included); #Parameters, size and CR are for the whole model. Tucker = "
        f"tensorcut `{s['tucker_method']}`.",
        "After every training or fine-tuning run the BatchNorm running statistics are re-estimated "
        "by one forward pass over the training subset (after only tens of Adam steps the "
        "momentum-0.1 averages lag the weights; evaluated with them, VGG11 with CP layers trained "
        "from scratch scores 0.13 instead of 0.76). The models tensorized without fine-tuning are "
        "evaluated as they come out of the decomposition (the thesis's protocol); the extra column "
        "gives them with BN statistics re-estimated, no weight changed.",
        "The thesis columns are its CIFAR-10 results (full-width networks, 50 epochs on a GPU) for "
        "reference: compare trends (which method holds up at which retention), not absolute "
        "accuracies.",
    ]
    rows_all = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows_all))
    for m in models:
        for strat in ("scratch", "pretrained", "finetune"):
            ustrat = "uncompressed-scratch" if strat == "scratch" else "uncompressed"
            unc = next((r for r in rows_all if r["model"] == m and r["strategy"] == ustrat), None)
            rows = [r for r in rows_all if r["model"] == m and r["strategy"] == strat]
            if not rows:
                continue
            order = {"cp": 0, "tucker": 1, "tt": 2}
            rows.sort(key=lambda r: (order.get(r["method"], 9), r["retention"]))
            head = [
                "Method",
                "% Parameters",
                "#Parameters",
                "Model size (MB)",
                "Compression ratio",
                "Accuracy",
                "conv ret.",
                "thesis #Parameters",
                "thesis CR",
                "thesis Accuracy",
            ]
            if strat == "pretrained":
                head.insert(6, "Accuracy, BN re-estimated")
            table = []
            for r in ([unc] if unc else []) + rows:
                t = r.get("thesis") or {}
                cells = [
                    METHOD_NAMES.get(r["method"], r["method"]),
                    r["retention"] if r["retention"] else 1.0,
                    f"{r['params']:,}",
                    f"{r['size_mb']:.3f}",
                    f"{r['compression_ratio']:.3f}x",
                    f"{r['top1']:.4f}",
                    f"{r['conv_retention']:.3f}",
                    f"{t['params']:,}" if t else "-",
                    f"{t['compression_ratio']}x" if t else "-",
                    t.get("accuracy", "-") if t else "-",
                ]
                if strat == "pretrained":
                    cells.insert(
                        6, f"{r['top1_bn_reestimated']:.4f}" if "top1_bn_reestimated" in r else "-"
                    )
                table.append(tuple(cells))
            tno = THESIS_TABLE_NO.get((m, strat), "?")
            parts.append(
                f"## {m}, {STRATEGY_TITLES[strat]} (cf. thesis Table {tno})\n\n"
                + md_table(head, table)
            )
    notes = sorted({n for r in rows_all for n in r.get("notes", []) or []})
    if notes:
        parts.append("Notes from the planner:\n\n" + "\n".join(f"- {n}" for n in notes[:40]))
    timing = [
        (
            r["model"],
            r["strategy"],
            METHOD_NAMES.get(r["method"], r["method"]),
            r["retention"],
            r.get("train_seconds") or r.get("ft_seconds") or "-",
            r.get("decompose_seconds", "-"),
            r.get("mean_kernel_rel_error", "-"),
        )
        for r in rows_all
    ]
    parts.append(
        "Costs and kernel errors (train/fine-tune seconds; decomposition seconds; mean relative "
        "kernel error of the factorized layers):\n\n"
        + md_table(
            [
                "model",
                "strategy",
                "method",
                "retention",
                "train s",
                "decompose s",
                "mean kernel error",
            ],
            timing,
        )
    )
    runs = result.get("runs", [])
    for i, r in enumerate(runs):
        ld = r.get("load") or {}
        parts.append(
            f"Run {i + 1}: `{r['command']}` started {r['started']}, {r.get('seconds', '?')} s, "
            f"1-min load mean {ld.get('load1_mean', '?')} (min {ld.get('load1_min', '?')}, max "
            f"{ld.get('load1_max', '?')}); `uptime` at start `{r['uptime_at_start']}`, at the end "
            f"`{r.get('uptime_at_end', r.get('uptime_last', '?'))}`."
        )
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
