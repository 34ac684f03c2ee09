"""CLI verbs `compress`, `finetune`, `export`."""

from __future__ import annotations

import argparse
import json
import warnings
from typing import TYPE_CHECKING

from tensorcut.errors import TensorcutError

if TYPE_CHECKING:
    from tensorcut.cli.flags import Flag
    from tensorcut.train.loop import FitConfig

#: What the help says of --distill-alpha's default: the recipes leave it 0, which
#: :func:`~tensorcut.pipeline.workflow.finetune_checkpoint` takes as 0.5 when there is a teacher.
_DISTILL_ALPHA_DEFAULT = "0.5"


def _recipe_default(name: str) -> str:
    """The help's default of a recipe flag of ``finetune``: the ``--recipe``'s value."""
    from tensorcut.cli.flags import describe
    from tensorcut.pipeline.workflow import RECIPES

    if name == "distill_alpha":
        return _DISTILL_ALPHA_DEFAULT
    values = {r: describe(getattr(cfg, name)) for r, cfg in RECIPES.items()}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return "the recipe's: " + ", ".join(f"{r} {v}" for r, v in values.items())


def _rank_arg(text: str) -> int | tuple[int, ...]:
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"rank must be an int or comma-separated ints, got {text!r}"
        ) from None
    if not parts:
        raise argparse.ArgumentTypeError("empty rank")
    return parts[0] if len(parts) == 1 else tuple(parts)


#: --allocation measured without --budget (checked before any work)
MEASURED_NEEDS_BUDGET = (
    "--allocation measured splits a --budget by the layers' measured accuracy costs; give "
    "--budget too (with --budget-kind macs or params)"
)


def _allocation_flag() -> Flag:
    from tensorcut.cli.flags import Flag
    from tensorcut.compression.config import ALLOCATIONS

    return Flag(
        choices=ALLOCATIONS,
        help="how --budget is split: ladder (each layer's rank ladder and kernel error, weighted "
        "by --sensitivity) or measured (each layer compressed alone at ten ranks on the "
        "calibration images of --bn-images, BatchNorm re-estimated, its calibration loss "
        "measured; then per layer dense or one measured rank, the least summed loss increase "
        "within the budget; the table is saved as DIR/drops.json, reusable with --drops)",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    from tensorcut.cli.flags import add_dataclass_flags, add_out, describe
    from tensorcut.cli.options import add_fit_flags, add_method_option_flags
    from tensorcut.compression import DEFAULT_METHOD, CompressConfig
    from tensorcut.layers import list_methods
    from tensorcut.pipeline.workflow import DEFAULT_BN_IMAGES, DEFAULT_MATCH_LR, RECIPES

    c = sub.add_parser(
        "compress",
        help="factorize a checkpoint's convolutions",
        description="Plan and apply a tensor decomposition to every selected conv layer.",
    )
    c.add_argument("checkpoint", help="dense (or compressed) checkpoint directory")
    c.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=[*list_methods(), "auto"],
        help="decomposition (auto: per layer, the smallest that meets the layer's error share)",
    )
    g = c.add_mutually_exclusive_group()
    g.add_argument("--rank", type=_rank_arg, help="explicit rank (int) or ranks (comma-separated)")
    g.add_argument(
        "--keep",
        type=float,
        metavar="FRACTION",
        help="fraction of each layer's parameters to keep, in (0, 1) (0.3 keeps 30%%)",
    )
    g.add_argument(
        "--ratio",
        type=float,
        dest="ratio_deprecated",
        metavar="FRACTION",
        help="deprecated name of --keep (same meaning: the fraction kept, not a compression "
        "factor)",
    )
    g.add_argument(
        "--eps", type=float, help="bound on each kernel's relative Frobenius error, in (0, 1)"
    )
    g.add_argument("--energy", type=float, help="fraction of each kernel's squared norm to keep")
    g.add_argument("--vbmf", action="store_true", help="Tucker-2 ranks by empirical VBMF")
    g.add_argument(
        "--budget",
        type=float,
        help="model-wide budget: < 1 is a fraction of the selected layers' cost, else a count",
    )
    g.add_argument(
        "--target-speedup",
        type=float,
        metavar="X",
        help="plan for speed: time each layer dense and factorized on this machine (current "
        "threads, batch 1) and choose ranks so the whole model runs X times faster (e.g. 1.5) "
        "with the least error; layers not faster stay dense, and if the whole compressed model "
        "is not measurably faster than dense, nothing is compressed",
    )
    c.add_argument(
        "--budget-kind", choices=("params", "macs"), default="params", help="what --budget counts"
    )
    add_dataclass_flags(
        c,
        CompressConfig,
        only=("allocation",),
        flags={"allocation": _allocation_flag()},
        defaults=lambda name: describe(getattr(CompressConfig(ratio=0.5), name)),
    )
    c.add_argument(
        "--drops",
        default=None,
        metavar="FILE",
        help="with --allocation measured: reuse measured drops (the drops.json of an earlier "
        "`compress --allocation measured`, or a run's study/drops.json; JSON, checked against "
        "the model) instead of measuring",
    )
    c.add_argument(
        "--sensitivity",
        default=None,
        help="results file of `tensorcut analyze` (or JSON layer->weight): "
        "sensitive layers are compressed more mildly under --budget",
    )
    c.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="conv layer names (default: all with > 3 input channels)",
    )
    c.add_argument(
        "--latency",
        action="store_true",
        help="keep a layer dense unless its factorized form is faster here",
    )
    c.add_argument(
        "--bn-images",
        type=int,
        default=None,
        metavar="N",
        help="re-estimate BatchNorm statistics on N training images after compressing (default: "
        f"{DEFAULT_BN_IMAGES}, or all of a smaller training split, when the checkpoint's data set "
        "is available; 0: keep the trained statistics)",
    )
    c.add_argument(
        "--match-epochs",
        type=int,
        default=0,
        metavar="N",
        help="layer matching before fine-tuning: after BatchNorm re-estimation, fit each "
        "factorized conv's output to its dense original's on the --bn-images calibration images "
        "for N passes (no labels; only the factors train), then re-estimate BatchNorm again "
        "(default: 0, off)",
    )
    c.add_argument(
        "--match-lr",
        type=float,
        default=DEFAULT_MATCH_LR,
        metavar="LR",
        help=f"Adam learning rate of layer matching (default: {describe(DEFAULT_MATCH_LR)})",
    )
    c.add_argument(
        "--align",
        type=int,
        default=1,
        metavar="N",
        help="round every rank to a multiple of N (8 or 16 run faster on SIMD units); default 1",
    )
    c.add_argument(
        "--evaluate",
        choices=("val", "test"),
        default=None,
        help="evaluate the compressed model on this split",
    )
    add_out(c, "checkpoint", required=True)
    c.add_argument("--force", action="store_true", help="replace a checkpoint already in --out")
    c.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_method_option_flags(c)
    c.set_defaults(func=_compress)

    f = sub.add_parser(
        "finetune",
        help="fine-tune a compressed checkpoint (thesis recipe by default)",
        description="Fine-tune from the checkpoint's (decomposed) weights. Recipes: 'thesis' "
        "(default): Adam lr 1e-5, early stopping on validation loss (patience 3), at most 50 "
        "epochs; 'rsdtr' (the RSDTR paper's): SGD momentum 0.9, weight decay 1e-4, one-cycle "
        "learning rate peaking at 0.01, 160 epochs, no early stopping. Explicit flags override "
        "the recipe's values.",
    )
    f.add_argument("checkpoint", help="compressed (or dense) checkpoint directory")
    f.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="thesis",
        help="starting recipe (default: thesis)",
    )
    f.add_argument("--dataset", default=None, help="default: the checkpoint's")
    f.add_argument(
        "--subset",
        type=int,
        default=None,
        help="fine-tune on a seeded random subset of N training images (default: all)",
    )
    f.add_argument("--batch-size", type=int, default=128, help="images per optimisation step")
    f.add_argument("--distill-from", default=None, help="dense checkpoint to distil from (teacher)")
    f.add_argument("--device", default="auto", help="auto | cpu | cuda")
    o = f.add_mutually_exclusive_group()
    add_out(f, "checkpoint", group=o, note="one of --out and --in-place is required")
    o.add_argument(
        "--in-place",
        action="store_true",
        help="replace CHECKPOINT by the fine-tuned model; its weights are "
        "kept until the new ones are completely written",
    )
    f.add_argument("--force", action="store_true", help="replace a checkpoint already in --out")
    f.add_argument(
        "--json",
        action="store_true",
        help="print test metrics before / after as JSON (progress goes to stderr)",
    )
    add_fit_flags(f, _recipe_default)
    f.set_defaults(func=_finetune)

    e = sub.add_parser(
        "export", help="export to ONNX, TorchScript or torch.export (checked against PyTorch)"
    )
    e.add_argument("checkpoint", help="checkpoint directory")
    e.add_argument(
        "--format",
        required=True,
        choices=("onnx", "torchscript", "exported"),
        help="onnx (needs the onnx extra), torchscript or exported (torch.export); the batch "
        "dimension is dynamic in every format",
    )
    add_out(
        e,
        "file",
        note="default: inside the checkpoint directory; an earlier export in the same format is "
        "replaced, any other existing file needs --force",
    )
    e.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out file that is not an earlier export",
    )
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=_export)


def _compress(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tensorcut.checkpoint import CheckpointMeta, Metrics
    from tensorcut.cli.options import method_options_from_args
    from tensorcut.compression import CompressConfig
    from tensorcut.pipeline.workflow import (
        DROPS_FILE,
        bn_recalibration_line,
        compress_checkpoint,
        match_line,
    )

    if args.ratio_deprecated is not None:
        warnings.warn(
            f"--ratio is deprecated; use --keep {args.ratio_deprecated:g} (the fraction of each "
            "layer's parameters kept)",
            FutureWarning,
            stacklevel=2,
        )
        args.keep = args.ratio_deprecated
    if args.sensitivity and args.budget is None:
        raise TensorcutError("--sensitivity guides the --budget allocation; give --budget too")
    if args.allocation == "measured" and args.budget is None:
        raise TensorcutError(MEASURED_NEEDS_BUDGET)
    extra = {} if args.allocation is None else {"allocation": args.allocation}
    cfg = CompressConfig(
        method=args.method,
        rank="vbmf" if args.vbmf else args.rank,
        ratio=args.keep,
        eps=args.eps,
        energy=args.energy,
        budget=args.budget,
        budget_kind=args.budget_kind,
        latency=args.latency,
        target_speedup=args.target_speedup,
        align=args.align,
        options=method_options_from_args(args),
        **extra,
    )
    _, p, meta = compress_checkpoint(
        args.checkpoint,
        args.out,
        cfg,
        layers=args.layers,
        sensitivity=args.sensitivity,
        evaluate_split=args.evaluate,
        bn_images=args.bn_images,
        drops=args.drops,
        match_epochs=args.match_epochs,
        match_lr=args.match_lr,
        force=args.force,
    )
    info = CheckpointMeta.from_meta(meta)
    bn, matched = info.lineage.bn_recalibration, info.lineage.layer_matching
    drops_file = Path(args.out) / DROPS_FILE if cfg.allocation == "measured" else None
    if drops_file is not None and args.drops is None and drops_file.is_file():
        drops_note = f"measured drops: {drops_file} (reuse with --drops {drops_file})"
    else:
        drops_note, drops_file = None, None
    if args.json:
        from tensorcut.console import print_json

        doc = json.loads(p.to_json())
        if bn is not None:
            doc["bn_recalibration"] = bn.to_dict()
        if matched is not None:
            doc["layer_matching"] = matched.to_dict()
        if drops_file is not None:
            doc["drops"] = str(drops_file)
        print_json(doc)
    else:
        print(p.table())
        if "speed" in p.config:
            from tensorcut.compression.speed import describe_speed

            print(describe_speed(p.config["speed"]))
        if drops_note is not None:
            print(drops_note)
        print(bn_recalibration_line(bn))
        line = match_line(matched)
        if line is not None:
            print(line)
        for split in info.metrics or ():
            m = (info.metrics or Metrics())[split]
            print(
                f"{split} after compression (no fine-tuning): top-1 {m.top1:.4f}  top-5 "
                f"{m.top5:.4f}"
            )
        print(f"compressed checkpoint: {args.out} (plan: {args.out}/plan.json)")
    return 0


def finetune_config(args: argparse.Namespace) -> FitConfig:
    """The FitConfig of ``tensorcut finetune``: the ``--recipe``'s, with every given flag applied
    (a fresh, validated copy; the recipe itself is untouched)."""
    from tensorcut.cli.options import fit_config_from_args
    from tensorcut.pipeline.workflow import RECIPES

    return fit_config_from_args(args, RECIPES[args.recipe])


def _finetune(args: argparse.Namespace) -> int:
    from tensorcut.pipeline.workflow import finetune_checkpoint

    if args.out is None and not args.in_place:
        raise TensorcutError(
            f"say where the fine-tuned model goes: --out NEW_DIR, or --in-place to replace "
            f"{args.checkpoint} (its weights are kept until the new ones are written)"
        )
    from tensorcut.train.api import check_numbers

    check_numbers(batch_size=args.batch_size, subset=args.subset)
    cfg = finetune_config(args)
    ck = finetune_checkpoint(
        args.checkpoint,
        args.out,
        dataset=args.dataset,
        config=cfg,
        distill_from=args.distill_from,
        batch_size=args.batch_size,
        subset=args.subset,
        device=args.device,
        force=args.force,
    )
    info = ck.info
    assert info.metrics is not None  # finetune_checkpoint records both scores
    b, a = info.metrics["test_before_finetune"], info.metrics["test"]
    epochs = len(info.finetune_history or ())
    if args.json:
        from tensorcut.console import print_json

        print_json(
            {
                "checkpoint": str(args.out or args.checkpoint),
                "test_before_finetune": b.to_dict(),
                "test": a.to_dict(),
                "epochs": epochs,
            }
        )
        return 0
    print(f"test top-1: {b.top1:.4f} before fine-tuning -> {a.top1:.4f} after ({epochs} epochs)")
    print(f"checkpoint: {args.out or args.checkpoint}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from tensorcut.pipeline.workflow import export_checkpoint_checked

    e = export_checkpoint_checked(args.checkpoint, args.format, args.out, force=args.force)
    if args.json:
        from tensorcut.console import print_json

        print_json(
            {"format": args.format, "path": str(e.path), "checked": e.checked, "check": e.note}
        )
    else:
        print(f"exported {args.format}: {e.path} ({e.note})")
    return 0
