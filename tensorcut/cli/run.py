"""CLI verbs `run` and `report`."""

from __future__ import annotations

import argparse
import sys

from tensorcut.cli.flags import Flag, add_dataclass_flags, add_out, describe, given_values
from tensorcut.pipeline.run import RunConfig

#: The goal fields of RunConfig: one of them is required (a mutually exclusive group).
_GOALS = ("target_ratio", "target_macs", "max_drop")


def _bipartition(text: str) -> str:
    from tensorcut.errors import TensorcutError
    from tensorcut.tenalg import canonical_bipartition

    try:
        return canonical_bipartition(text)
    except TensorcutError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run_flags() -> dict[str, Flag]:
    """How RunConfig's fields show on the command line (RunConfig carries no help of its own).
    ``train_subset`` keeps its user-visible name ``--subset``."""
    from tensorcut.layers import list_methods

    return {
        "target_ratio": Flag(
            metavar="FACTOR",
            help="compression factor to reach: dense / compressed conv-layer parameters, > 1 "
            "(5 = five times smaller; compare `compress --keep`, the fraction kept)",
        ),
        "target_macs": Flag(help="fraction of conv-layer MACs to keep (e.g. 0.25)"),
        "max_drop": Flag(help="largest allowed top-1 drop (e.g. 0.01)"),
        "method": Flag(
            choices=[*list_methods(), "auto"],
            help="decomposition (auto: per layer, the smallest that meets the layer's error share)",
        ),
        "calib_subset": Flag(help="calibration images from the validation split"),
        "bipartitions": Flag(
            type=_bipartition,
            metavar="NAME",
            help="kernel bipartitions of the truncation study (OUT IN KH KW OUT-IN OUT-KH OUT-KW)",
        ),
        "curve_ratios": Flag(
            metavar="FACTOR",
            help="compression factors (> 1) of the accuracy-vs-compression curve that chooses "
            "the allocation",
        ),
        "finetune_epochs": Flag(help="most fine-tuning epochs (early stopping)"),
        "finetune_lr": Flag(help="fine-tuning learning rate (Adam)"),
        "finetune_patience": Flag(
            help="stop fine-tuning after this many epochs without a better validation loss"
        ),
        "distill": Flag(help="distil from the dense model while fine-tuning"),
        "bn_recalibrate": Flag(
            help="re-estimate BatchNorm statistics on the calibration subset after compressing, "
            "before comparing allocations and before fine-tuning (--no-bn-recalibrate: keep the "
            "dense model's)"
        ),
        "probe_epochs": Flag(
            help="fine-tune each candidate allocation this long before choosing "
            "(0: choose right after compression)"
        ),
        "probe_images": Flag(help="training images of the probe fine-tune"),
        "batch_size": Flag(help="images per optimisation step of the probe and the fine-tuning"),
        "seed": Flag(help="seed of the training (with --model), the probe and the fine-tuning"),
        "train_subset": Flag(
            name="subset",
            metavar="N",
            none_text="all",
            help="train (with --model) and fine-tune on a seeded random subset of N training "
            "images",
        ),
        "measured": Flag(
            help="also compare the measured allocation (each layer compressed alone at ten ranks "
            "on the calibration images, its calibration loss measured, then a knapsack within the "
            "budget; kept in study/drops.json); off by default: it costs about as much as the "
            "rest of the compression stages together and tied the other allocations in the "
            "pruning-frontier benchmark"
        ),
        "match_epochs": Flag(
            metavar="N",
            help="layer matching of the chosen compressed model before fine-tuning: fit each "
            "factorized conv's output to its dense original's on the calibration images for N "
            "passes, then re-estimate BatchNorm again (0: off)",
        ),
        "match_lr": Flag(metavar="LR", help="Adam learning rate of layer matching"),
    }


def _run_default(name: str) -> str | None:
    """The help's default of a RunConfig flag: the field's default (a goal has none)."""
    if name in _GOALS:
        return None
    from dataclasses import fields

    f = next(f for f in fields(RunConfig) if f.name == name)
    return describe(f.default, _run_flags()[name].none_text)


def add_commands(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "run",
        help="the main job: study, compress to a goal, fine-tune, verify, export, report",
        description="From a trained checkpoint (or --model/--dataset) to a smaller, verified model "
        "with a report. "
        "Resumable: re-running skips finished stages.",
    )
    r.add_argument("checkpoint", nargs="?", default=None, help="trained checkpoint directory")
    r.add_argument("--model", default=None, help="zoo model to train first (with --dataset)")
    r.add_argument(
        "--dataset",
        default=None,
        help="data set to train on with --model (a checkpoint names its own)",
    )
    r.add_argument("--data-dir", default=None, help="folder holding the data set's files")
    r.add_argument("--epochs", type=int, default=10, help="training epochs when --model is given")
    r.add_argument(
        "--width", type=float, default=1.0, help="channel width multiplier when --model is given"
    )
    flags = _run_flags()
    goal = r.add_mutually_exclusive_group(required=True)
    add_dataclass_flags(goal, RunConfig, flags=flags, only=_GOALS, defaults=_run_default)
    add_dataclass_flags(
        r.add_argument_group("run recipe (RunConfig)"),
        RunConfig,
        flags=flags,
        skip=_GOALS,
        defaults=_run_default,
    )
    add_out(r, "run", required=True)
    r.add_argument(
        "--json",
        action="store_true",
        help="print the verification summary as JSON (progress goes to stderr)",
    )
    r.set_defaults(func=_run)
    p = sub.add_parser(
        "report",
        help="(re)write RUN_DIR/report.html",
        description="Render the HTML report of a run.",
    )
    p.add_argument("run_dir", help="run directory of `tensorcut run`")
    p.add_argument("--json", action="store_true", help="print the report path as JSON")
    p.set_defaults(func=_report)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of ``tensorcut run``: its defaults, with every given flag applied."""
    return RunConfig(**given_values(args, RunConfig))


def _run(args: argparse.Namespace) -> int:
    from tensorcut.pipeline.run import run

    s = run(
        args.out,
        run_config(args),
        checkpoint=args.checkpoint,
        model=args.model,
        dataset=args.dataset,
        train_epochs=args.epochs,
        width=args.width,
        data_dir=args.data_dir,
        command=["tensorcut", *sys.argv[1:]],
    )
    if args.json:
        from tensorcut.console import print_json

        print_json(s)
        return 0
    from tensorcut.pipeline.run import print_summary

    print_summary(s)
    return 0


def _report(args: argparse.Namespace) -> int:
    from tensorcut.pipeline.report import write_report

    path = write_report(args.run_dir)
    if args.json:
        from tensorcut.console import print_json

        print_json({"report": str(path)})
    else:
        print(f"report: {path}")
    return 0
