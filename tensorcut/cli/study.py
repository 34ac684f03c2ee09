"""CLI verbs ``analyze`` and ``plot`` (thin wrappers over :func:`analyze` and :func:`plot`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tensorcut.errors import TensorcutError


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``analyze`` and ``plot``."""
    from tensorcut.cli.flags import add_out

    a = sub.add_parser(
        "analyze",
        help="truncation study: spectra, accuracy vs norm loss sweeps, CP, recovery",
        description="Truncate the conv kernels of a checkpoint along kernel bipartitions "
        "(and CP ranks), "
        "evaluate each configuration and record it in an SQLite results file (resumable).",
    )
    a.add_argument(
        "checkpoint", metavar="DIR", help="checkpoint directory (model.safetensors + meta.json)"
    )
    a.add_argument(
        "--dataset",
        default=None,
        help="digits | fashion-mnist | cifar10 | cifar100 | synthetic "
        "(default: the checkpoint's data set)",
    )
    a.add_argument("--data-dir", default=None, help="folder holding the data set's files")
    a.add_argument(
        "--split",
        nargs="+",
        default=["val"],
        choices=("train", "val", "test"),
        help="split(s) to evaluate on (default val); several give one row per split",
    )
    a.add_argument(
        "--subset",
        type=int,
        default=None,
        help="evaluate on a seeded random subset of N images per split",
    )
    a.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="conv layers to truncate (default: every conv with more than one input channel)",
    )
    a.add_argument(
        "--bipartitions",
        nargs="+",
        default=None,
        help="OUT IN KH KW OUT-IN OUT-KH OUT-KW (default: all seven)",
    )
    a.add_argument(
        "--keep",
        nargs="+",
        default=None,
        help="keep values instead of the shape-derived grid: "
        "10,20 | 1:8 | OUT=10:60:10 | conv2:KW=1,2",
    )
    a.add_argument(
        "--cp-ranks", nargs="+", default=None, help="CP ranks to sweep per layer (ints or 'auto')"
    )
    a.add_argument(
        "--all-layers",
        action="store_true",
        help="also truncate every selected layer at once along each bipartition (and CP rank)",
    )
    a.add_argument(
        "--all-layer-fractions",
        type=float,
        nargs="+",
        default=None,
        help="keep fractions of each layer's spectrum for --all-layers (default 0.9 .. 0.05)",
    )
    a.add_argument("--no-single-layer", action="store_true", help="skip the single-layer sweeps")
    a.add_argument(
        "--recover",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="truncate all layers to near-chance accuracy (SVD OUT, SVD OUT-IN, CP) "
        "and retrain EPOCHS epochs",
    )
    a.add_argument(
        "--recover-subset",
        type=int,
        default=None,
        help="train on a seeded subset of N images for --recover",
    )
    a.add_argument(
        "--recover-lr", type=float, default=1e-3, help="learning rate (Adam) for --recover"
    )
    a.add_argument(
        "--entropy",
        choices=("vn", "literal"),
        default="vn",
        help="vn: -sum p ln p with p = S^2/sum S^2 (default); literal: paper Eq. 14 as printed",
    )
    a.add_argument("--batch-size", type=int, default=500, help="images per evaluation batch")
    a.add_argument(
        "--cache-gib",
        type=float,
        default=1.0,
        help="activation cache held in memory before spilling to disk (GiB, default 1)",
    )
    a.add_argument(
        "--spill-dir", default=None, help="where spilled cache files go (default: system temp)"
    )
    a.add_argument(
        "--no-cache", action="store_true", help="evaluate the full model for every configuration"
    )
    a.add_argument("--device", default="auto", help="auto | cpu | cuda")
    a.add_argument(
        "--csv",
        default=None,
        help="CSV export path (default: RESULTS with .csv); an existing file that is "
        "not an earlier export of this verb is refused unless --force",
    )
    a.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --csv file that is not an earlier CSV export",
    )
    a.add_argument(
        "--plots", default=None, metavar="FIGDIR", help="also write the figures into FIGDIR"
    )
    a.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are off anyway when stderr is not a terminal)",
    )
    a.add_argument("--json", action="store_true", help="print the sweep's summary as JSON")
    add_out(a, "results", required=True)
    a.set_defaults(func=_analyze)

    p = sub.add_parser(
        "plot",
        help="figures of a truncation study (PNG and SVG)",
        description="Draw spectra, accuracy-vs-norm-loss, depth, all-layer, CP "
        "and recovery figures.",
    )
    p.add_argument(
        "results", metavar="RESULTS", help="SQLite results file written by `tensorcut analyze`"
    )
    add_out(p, "figures", required=True)
    p.add_argument(
        "--format",
        nargs="+",
        default=["png", "svg"],
        choices=("png", "svg", "pdf"),
        help="figure file formats",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.01,
        help="top-1 drop (fraction) defining the tolerated norm loss in the depth figure",
    )
    p.add_argument("--json", action="store_true", help="print the figure files as JSON")
    p.set_defaults(func=_plot)


def _analyze(args: argparse.Namespace) -> int:
    from tensorcut import data as tdata
    from tensorcut.checkpoint import io as tio
    from tensorcut.study.shard import ShardReport
    from tensorcut.study.shard import (
        analyze_sharded as analyze,
    )  # plain analyze unless torchrun/RANK+WORLD_SIZE
    from tensorcut.train.api import check_dataset_fits
    from tensorcut.train.loop import resolve_device

    if not Path(args.checkpoint).is_dir():
        raise TensorcutError(
            f"{args.checkpoint} is not a checkpoint directory (model.safetensors + meta.json)"
        )
    if args.batch_size < 1:
        raise TensorcutError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.cache_gib < 0:
        raise TensorcutError(f"--cache-gib must be >= 0, got {args.cache_gib}")
    from tensorcut.train.api import check_numbers

    check_numbers(subset=args.subset)
    if args.recover_subset is not None and args.recover_subset < 1:
        raise TensorcutError(f"--recover-subset must be >= 1, got {args.recover_subset}")
    if args.recover < 0 or not args.recover_lr > 0:
        raise TensorcutError(
            "--recover must be >= 0 epochs and --recover-lr > 0; "
            f"got {args.recover} and {args.recover_lr:g}"
        )
    if args.keep is not None:
        from tensorcut.study.grid import parse_keep

        spec = parse_keep(args.keep)
        if not spec or any(not v for v in spec.values()):
            raise TensorcutError(
                f"--keep {' '.join(args.keep)!r} gives no keep values; give integers like 10,20 or "
                "1:8, or leave --keep out for the shape-derived grid"
            )
    _check_outputs(args)
    ck = tio.load_checkpoint(args.checkpoint)
    info = ck.info
    data_spec = info.dataset.resolve(args.dataset, args.data_dir)
    name = str(data_spec.name)  # (load refuses an unnamed data set before name is used)
    loaders = {}
    for split in dict.fromkeys(args.split):
        ds = data_spec.load(split, subset=args.subset)
        check_dataset_fits(info.model, ds, name)  # wrong channel count: one line, no traceback
        loaders[split] = tdata.make_loader(ds, args.batch_size)
    train_loader = None
    if args.recover:
        tr = data_spec.load("train", subset=args.recover_subset)
        train_loader = tdata.make_loader(tr, 128, shuffle=True, seed=data_spec.seed)
    model = ck.model.to(resolve_device(args.device))
    model_name = info.model.name
    subset = f"subset={args.subset}" if args.subset else "full"
    report = analyze(
        model,
        loaders,
        args.out,
        layers=args.layers,
        bipartitions=args.bipartitions,
        keep=args.keep,
        cp_ranks=args.cp_ranks,
        single_layer=not args.no_single_layer,
        all_layers=args.all_layers,
        all_layer_fractions=args.all_layer_fractions,
        recover_epochs=args.recover,
        train_loader=train_loader,
        recover_kwargs={"lr": args.recover_lr},
        entropy_form=args.entropy,
        model_name=model_name,
        data_name=f"{name}/{subset}",
        cache_bytes=int(args.cache_gib * (1 << 30)),
        spill_dir=args.spill_dir,
        use_cache=not args.no_cache,
        csv=args.csv or True,
        progress=not args.no_progress,
    )
    csv_path = Path(args.csv) if args.csv else Path(args.out).with_suffix(".csv")
    # one shard of a sharded sweep (docs/scaling.md): not the finished study
    shard = report if isinstance(report, ShardReport) and not report.final else None
    if args.json:
        from tensorcut.console import print_json

        res: dict[str, Any] = {"results": str(args.out), "evaluated": report.evaluated}
        if shard is None:
            files = []
            if args.plots:
                from tensorcut.study.plots import plot

                files = [str(f) for f in plot(args.out, args.plots)]
            res.update(
                skipped=report.skipped,
                seconds=report.seconds,
                csv=str(csv_path),
                baseline=report.baseline,
                fast_path=report.fast_path,
                figures=files,
            )
        else:
            res.update(shard=shard.rank, world_size=shard.world_size)
        print_json(res)
        return 0
    if shard is not None:
        print(
            f"shard {shard.rank + 1}/{shard.world_size}: "
            f"{shard.evaluated} configurations evaluated into {args.out}"
        )
        return 0
    for split, b in report.baseline.items():
        print(
            f"baseline {split}: top-1 {b['top1']:.4f}  top-5 {b['top5']:.4f}  "
            f"loss {b['loss']:.4f}  (n={b['n']})"
        )
    for layer, why in report.fast_path.items():
        print(
            f"{layer}: "
            + ("cached rest-of-network evaluation" if not why else f"full evaluation ({why})")
        )
    print(
        f"{report.evaluated} configurations evaluated, {report.skipped} already in {args.out} "
        f"({report.seconds:.1f} s); CSV: {csv_path}"
    )
    if args.plots:
        from tensorcut.study.plots import plot

        figures = plot(args.out, args.plots)
        print(f"{len(figures)} figure files in {args.plots}")
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse outputs that would replace something that is not this verb's own earlier output.

    Checked before any work is done.
    """
    from tensorcut.cli.flags import refuse_path_kind
    from tensorcut.study.store import COLUMNS

    refuse_path_kind(args.plots, True, "--plots")
    refuse_path_kind(args.spill_dir, True, "--spill-dir")
    csv_path = Path(args.csv) if args.csv else Path(args.out).with_suffix(".csv")
    spectra = csv_path.with_name(csv_path.stem + "-spectra.csv")
    for path, head in (
        (csv_path, ",".join(COLUMNS)),
        (spectra, "fingerprint,model,layer,depth,bipartition"),
    ):
        refuse_path_kind(path, False, "--csv")
        if path.exists() and not args.force:
            try:
                with path.open(encoding="utf-8") as fh:
                    first = fh.readline().strip()
            except (OSError, UnicodeDecodeError):
                first = ""
            if not first.startswith(head):
                raise TensorcutError(
                    f"{path} exists and is not a CSV export of `tensorcut analyze`; "
                    "pass --force to replace it or give another --csv"
                )


def _plot(args: argparse.Namespace) -> int:
    from tensorcut.study.plots import plot

    if not 0 <= args.max_drop <= 1:
        raise TensorcutError(f"--max-drop is a fraction of accuracy in [0, 1], got {args.max_drop}")
    files = plot(args.results, args.out, formats=tuple(args.format), max_drop=args.max_drop)
    if args.json:
        from tensorcut.console import print_json

        print_json({"figures": [str(f) for f in files]})
        return 0
    print(f"{len(files)} figure files in {args.out}")
    return 0


__all__ = ["add_commands"]
