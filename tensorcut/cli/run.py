"""CLI verbs `run` and `report`."""

from __future__ import annotations

import argparse
import sys


def add_commands(sub: argparse._SubParsersAction) -> None:
    from tensorcut.compression import DEFAULT_METHOD
    from tensorcut.layers import list_methods

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
    r.add_argument(
        "--subset",
        type=int,
        default=None,
        metavar="N",
        help="train (with --model) and fine-tune on a seeded random subset of N training images "
        "(default: all)",
    )
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--target-ratio",
        type=float,
        metavar="FACTOR",
        help="compression factor to reach: dense / compressed conv-layer parameters, > 1 "
        "(5 = five times smaller; compare `compress --keep`, the fraction kept)",
    )
    g.add_argument(
        "--target-macs", type=float, help="fraction of conv-layer MACs to keep (e.g. 0.25)"
    )
    g.add_argument("--max-drop", type=float, help="largest allowed top-1 drop (e.g. 0.01)")
    r.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=[*list_methods(), "auto"],
        help="decomposition (auto: per layer, the smallest that meets the layer's error share)",
    )
    r.add_argument(
        "--calib-subset", type=int, default=512, help="calibration images from the validation split"
    )
    r.add_argument(
        "--finetune-epochs",
        type=int,
        default=10,
        help="most fine-tuning epochs (early stopping, patience 3)",
    )
    r.add_argument(
        "--finetune-lr", type=float, default=1e-4, help="fine-tuning learning rate (Adam)"
    )
    r.add_argument(
        "--distill", action="store_true", help="distil from the dense model while fine-tuning"
    )
    r.add_argument(
        "--no-bn-recalibrate",
        action="store_true",
        help="keep the dense model's BatchNorm statistics after compressing "
        "(default: re-estimate them on the calibration subset before comparing allocations "
        "and before fine-tuning)",
    )
    r.add_argument(
        "--probe-epochs",
        type=int,
        default=1,
        help="fine-tune each candidate allocation this long before choosing "
        "(0: choose right after compression)",
    )
    r.add_argument(
        "--probe-images", type=int, default=2048, help="training images of the probe fine-tune"
    )
    r.add_argument(
        "--out", required=True, help="run directory (created, or resumed if it holds a run)"
    )
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


def _run(args: argparse.Namespace) -> int:
    from tensorcut.pipeline.run import RunConfig, run

    cfg = RunConfig(
        target_ratio=args.target_ratio,
        target_macs=args.target_macs,
        max_drop=args.max_drop,
        method=args.method,
        calib_subset=args.calib_subset,
        finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr,
        distill=args.distill,
        bn_recalibrate=not args.no_bn_recalibrate,
        probe_epochs=args.probe_epochs,
        probe_images=args.probe_images,
        train_subset=args.subset,
    )
    s = run(
        args.out,
        cfg,
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
