"""CLI verbs `train` and `evaluate`."""

from __future__ import annotations

import argparse
from typing import Any

from tensorcut.checkpoint import Score
from tensorcut.cli.flags import add_out, default_text, given_values
from tensorcut.cli.options import FIT_FLAGS, add_fit_flags, fit_config_from_args
from tensorcut.errors import TensorcutError
from tensorcut.train.api import RESUME_KEYS
from tensorcut.train.config import FitConfig

#: FitConfig fields `train` has no flag for, and why.
TRAIN_SKIPS = {
    "distill_alpha": "train has no teacher; distillation is a finetune option (--distill-from)",
    "distill_temperature": "train has no teacher; distillation is a finetune option",
}


def _train_default(name: str) -> str:
    """The help's default of a recipe flag of ``train``: FitConfig's (the recorded one on
    ``--resume`` for the optimiser state's settings)."""
    text = default_text(FitConfig, name, FIT_FLAGS)
    return f"{text}; with --resume, the recorded one" if name in RESUME_KEYS else text


def train_config(args: argparse.Namespace) -> FitConfig:
    """The FitConfig of ``tensorcut train``: FitConfig's defaults (on ``--resume``, the recorded
    optimiser, lr, momentum, weight decay and scheduler), with every given flag applied."""
    base = FitConfig()
    if getattr(args, "resume", False):
        from tensorcut.train.api import resume_config

        base = resume_config(args.out)
    return fit_config_from_args(args, base)


def add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--dataset, --data-dir, --subset (shared by verbs that read data)."""
    p.add_argument(
        "--dataset",
        required=required,
        help="digits | fashion-mnist | cifar10 | cifar100 | synthetic",
    )
    p.add_argument("--data-dir", default=None, help="folder holding the data set's files")
    p.add_argument(
        "--subset", type=int, default=None, help="use a seeded random subset of N images"
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a zoo model on a data set",
        description="Train a model; checkpoint every epoch.",
    )
    p.add_argument("--model", required=True, help="zoo model name (see `tensorcut inspect --list`)")
    add_data_args(p, required=True)
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="images per optimisation step (global under torchrun)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of the training split held out for validation",
    )
    p.add_argument(
        "--augment",
        action="store_true",
        help="light augmentation (random crop, flip where sensible)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_out(p, "checkpoint", required=True, unless="--resume")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint in --out with its recorded "
        "optimizer, lr, momentum, weight decay and scheduler (giving other values is refused)",
    )
    p.add_argument(
        "--method",
        choices=("dense", "tdlrt"),
        default="dense",
        help="tdlrt: train in Tucker format with rank-adaptive pruning (docs/tdlrt.md); "
        "its recipe where no flag is given: SGD lr 0.1 momentum 0.9 cosine (Adam: lr 3e-3)",
    )
    p.add_argument(
        "--tau",
        type=float,
        default=None,
        help="tdlrt: truncation tolerance relative to the core norm",
    )
    p.add_argument(
        "--init-rank",
        type=int,
        default=None,
        help="tdlrt: starting rank per mode (default: half the mode)",
    )
    p.add_argument("--rmax", type=int, default=None, help="tdlrt: rank cap per mode")
    p.add_argument(
        "--init-from",
        default=None,
        help="tdlrt: start from this dense or Tucker checkpoint (HOSVD)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the test metrics and checkpoint path as JSON (progress goes to stderr)",
    )
    add_fit_flags(p, _train_default, skip=TRAIN_SKIPS)
    p.set_defaults(func=_train)

    e = sub.add_parser(
        "evaluate",
        help="loss, top-1, top-5 of a checkpoint",
        description="Evaluate a checkpoint on a split.",
    )
    e.add_argument("checkpoint", help="checkpoint directory")
    add_data_args(e)
    e.add_argument(
        "--split", choices=("train", "val", "test"), default="test", help="split to evaluate on"
    )
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=_evaluate)


def _train(args: argparse.Namespace) -> int:
    from tensorcut.console import print_json
    from tensorcut.train.api import check_numbers, train_checkpoint

    check_numbers(
        batch_size=args.batch_size,
        width=args.width,
        val_fraction=args.val_fraction,
        subset=args.subset,
    )
    cfg = train_config(args)
    if args.method == "tdlrt":
        return _tdlrt(args, cfg)
    ck = train_checkpoint(
        args.model,
        args.dataset,
        args.out,
        epochs=cfg.epochs,
        width=args.width,
        batch_size=args.batch_size,
        config=cfg,
        data_dir=args.data_dir,
        val_fraction=args.val_fraction,
        subset=args.subset,
        augment=args.augment,
        device=args.device,
        resume=args.resume,
    )
    from tensorcut import distributed as tdist

    if tdist.env_world()[0] != 0:  # every rank holds the same reduced metrics: rank 0 prints them
        return 0
    info = ck.info
    test = info.score("test") or Score()
    if args.json:
        print_json({"checkpoint": str(args.out), "test": test.to_dict(), "epochs": info.epoch})
    else:
        print(_score_line(test))
        print(f"checkpoint: {args.out}")
    return 0


def _score_line(m: Score) -> str:
    """``test: loss L  top-1 A  top-5 B  (n=N)``."""
    return (
        f"test: loss {_num(m.loss)}  top-1 {_num(m.top1)}  top-5 {_num(m.top5)}  "
        f"(n={m.n if m.n is not None else '?'})"
    )


def _num(v: Any, spec: str = ".4f") -> str:
    """A recorded number as the console shows it ("?" when it was not recorded)."""
    return "?" if v is None else format(v, spec)


def _evaluate(args: argparse.Namespace) -> int:
    from tensorcut.train.api import evaluate_checkpoint as evaluate

    m = evaluate(
        args.checkpoint,
        args.dataset,
        args.split,
        data_dir=args.data_dir,
        subset=args.subset,
        device=args.device,
    )
    if args.json:
        from tensorcut.console import print_json

        print_json(m)
    else:
        print(
            f"{args.split}: loss {m['loss']:.4f}  top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  "
            f"(n={m['n']})"
        )
    return 0


#: FitConfig fields ``train --method tdlrt`` cannot honour, with their flags: refused, not ignored.
TDLRT_IGNORES = {
    "patience": "--patience",
    "amp": "--amp",
    "sync_batchnorm": "--sync-bn",
    "grad_clip": "--grad-clip",
}


def _tdlrt(args: argparse.Namespace, cfg: FitConfig) -> int:
    """Entry for ``tensorcut train --method tdlrt`` (the ``train`` verb's arguments and recipe)."""
    if args.tau is None:
        raise TensorcutError("--method tdlrt needs --tau (relative truncation tolerance, e.g. 0.1)")
    if getattr(args, "resume", False):
        raise TensorcutError(
            "--resume is not supported with --method tdlrt; start a new run with another --out"
        )
    given = given_values(args, FitConfig)
    unused = [flag for field, flag in TDLRT_IGNORES.items() if given.get(field)]
    if unused:
        raise TensorcutError(
            f"{unused[0]} is not used by --method tdlrt (its integrator trains without early "
            "stopping, autocast, SyncBatchNorm or gradient clipping); drop it"
        )
    from tensorcut import distributed as tdist
    from tensorcut.train.tdlrt import tdlrt_recipe
    from tensorcut.train.tdlrt_verb import train_tdlrt_checkpoint

    # TDLRT's own recipe (SGD 0.1 cosine; Adam 3e-3), not the dense one, where no flag is given
    recipe = tdlrt_recipe(
        **{
            k: given[k]
            for k in ("optimizer", "lr", "momentum", "weight_decay", "scheduler")
            if k in given
        }
    )

    ck = train_tdlrt_checkpoint(
        args.model,
        args.dataset,
        args.out,
        tau=args.tau,
        init_rank=args.init_rank,
        rmax=args.rmax,
        init_from=getattr(args, "init_from", None),
        epochs=cfg.epochs,
        width=args.width,
        batch_size=args.batch_size,
        **recipe,
        data_dir=args.data_dir,
        val_fraction=args.val_fraction,
        subset=args.subset,
        augment=args.augment,
        seed=cfg.seed,
        device=args.device,
    )
    if tdist.env_world()[0] != 0:  # every rank holds the same reduced metrics: rank 0 prints them
        return 0
    info = ck.info
    test = info.score("test") or Score()
    t = info.lineage.tdlrt
    if t is None:
        raise TensorcutError(f"{args.out} records no tdlrt settings; the run did not finish")
    if getattr(args, "json", False):
        from tensorcut.console import print_json

        print_json(
            {
                "checkpoint": str(args.out),
                "test": test.to_dict(),
                "epochs": info.epoch,
                "conv_cr": t.conv_cr,
                "conv_compression_pct": t.conv_compression_pct,
            }
        )
        return 0
    print(_score_line(test))
    print(f"conv compression {_num(t.conv_compression_pct, '.1f')}% (CR {_num(t.conv_cr, '.2f')})")
    print(f"checkpoint: {args.out}")
    return 0
