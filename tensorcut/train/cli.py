"""CLI verbs `train` and `evaluate`."""

from __future__ import annotations

import argparse
import json

from tensorcut.train.loop import OPTIMIZERS, SCHEDULERS, FitConfig


def add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--dataset, --data-dir, --subset (shared by verbs that read data)."""
    p.add_argument("--dataset", required=required, help="digits | fashion-mnist | cifar10 | cifar100 | synthetic")
    p.add_argument("--data-dir", default=None, help="folder holding the data set's files")
    p.add_argument("--subset", type=int, default=None, help="use a seeded random subset of N images")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a zoo model on a data set", description="Train a model; checkpoint every epoch.")
    p.add_argument("--model", required=True, help="zoo model name (see `tensorcut inspect --list`)")
    add_data_args(p, required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="plateau")
    p.add_argument("--patience", type=int, default=None, help="early stopping on validation loss")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--augment", action="store_true", help="light augmentation (random crop, flip where sensible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 + loss scaling on CUDA, bfloat16 on CPU)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun ranks (CUDA only)")
    p.add_argument("--method", choices=("dense", "tdlrt"), default="dense",
                   help="tdlrt: train in Tucker format with rank-adaptive pruning (docs/tdlrt.md)")
    p.add_argument("--tau", type=float, default=None, help="tdlrt: truncation tolerance relative to the core norm")
    p.add_argument("--init-rank", type=int, default=None, help="tdlrt: starting rank per mode (default: half the mode)")
    p.add_argument("--rmax", type=int, default=None, help="tdlrt: rank cap per mode")
    p.add_argument("--init-from", default=None, help="tdlrt: start from this dense or Tucker checkpoint (HOSVD)")
    p.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="loss, top-1, top-5 of a checkpoint", description="Evaluate a checkpoint on a split.")
    e.add_argument("checkpoint", help="checkpoint directory")
    add_data_args(e)
    e.add_argument("--split", choices=("train", "val", "test"), default="test")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=_evaluate)


def _train(args: argparse.Namespace) -> int:
    from tensorcut.train.api import train

    if args.method == "tdlrt":
        from tensorcut.train.tdlrt_verb import run_cli

        return run_cli(args)

    cfg = FitConfig(epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay, scheduler=args.scheduler, patience=args.patience, seed=args.seed,
                    amp=args.amp, sync_batchnorm=args.sync_bn)
    ck = train(args.model, args.dataset, args.out, epochs=args.epochs, width=args.width, batch_size=args.batch_size,
               config=cfg, data_dir=args.data_dir, val_fraction=args.val_fraction, subset=args.subset,
               augment=args.augment, device=args.device, resume=args.resume)
    from tensorcut import distributed as tdist

    if tdist.env_world()[0] == 0:  # under torchrun every rank holds the same reduced metrics: rank 0 prints them
        m = ck.meta["metrics"]["test"]
        print(f"test: loss {m['loss']:.4f}  top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  (n={m['n']})")
        print(f"checkpoint: {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from tensorcut.train.api import evaluate

    m = evaluate(args.checkpoint, args.dataset, args.split, data_dir=args.data_dir, subset=args.subset, device=args.device)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"{args.split}: loss {m['loss']:.4f}  top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  (n={m['n']})")
    return 0
