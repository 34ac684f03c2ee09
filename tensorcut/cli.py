"""Command-line entry point: every verb is a thin wrapper over a Python function.

Verbs live beside the code they wrap; each module in ``COMMAND_MODULES`` exposes
``add_commands(subparsers)``. Bad input (:class:`TensorcutError`) prints one line and
exits with status 2.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import warnings
from pathlib import Path

from tensorcut.errors import TensorcutError

COMMAND_MODULES: tuple[str, ...] = (
    "tensorcut.train.cli",
    "tensorcut.analysis.cli",
    "tensorcut.workflow_cli",
    "tensorcut.run_cli",
)


def _inspect(args: argparse.Namespace) -> int:
    from tensorcut import data as tdata
    from tensorcut import io as tio
    from tensorcut import models
    from tensorcut.summary import summarize

    if args.list:
        for name in models.list_models():
            print(f"{name:12s} {models.model_entry(name).description}")
        return 0
    if not args.target:
        raise TensorcutError("give a checkpoint directory or a model name (or --list)")
    if Path(args.target).is_dir():
        ck = tio.load_checkpoint(args.target)
        model, kw = ck.model, ck.meta["model"].get("kwargs", {})
        title = f"{args.target} ({ck.meta['model']['name']})"
    else:
        kw = {"num_classes": args.num_classes, "in_channels": args.in_channels, "width": args.width,
              "input_size": args.input_size}
        if args.dataset:
            info = tdata.dataset_info(args.dataset)
            kw.update(num_classes=info.num_classes, in_channels=info.in_channels, input_size=info.image_size)
        model = models.create(args.target, **kw)
        title = args.target
    size = int(kw.get("input_size", args.input_size))
    s = summarize(model, (int(kw.get("in_channels", 3)), size, size))
    if args.json:
        print(json.dumps(s.to_dict(), indent=2))
    else:
        print(title)
        print(s.table())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tensorcut.demo import run_demo

    return run_demo(args.out, fast=args.fast)


def build_parser() -> argparse.ArgumentParser:
    """The full parser (also used to generate the CLI reference)."""
    from tensorcut import __version__

    parser = argparse.ArgumentParser(prog="tensorcut", description="Compress CNNs with tensor-network decompositions of their kernels.")
    parser.add_argument("--version", action="version", version=f"tensorcut {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="VERB")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).add_commands(sub)
    i = sub.add_parser("inspect", help="table of conv / linear layers: shapes, params, MACs, ranks",
                       description="List every conv and linear layer of a checkpoint or a zoo model.")
    i.add_argument("target", nargs="?", help="checkpoint directory or zoo model name")
    i.add_argument("--list", action="store_true", help="list zoo models")
    i.add_argument("--dataset", default=None, help="size the zoo model for this data set")
    i.add_argument("--num-classes", type=int, default=10)
    i.add_argument("--in-channels", type=int, default=3)
    i.add_argument("--input-size", type=int, default=32)
    i.add_argument("--width", type=float, default=1.0)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_inspect)
    d = sub.add_parser("demo", help="the main job on the embedded digits data", description="Run the demo pipeline.")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--fast", action="store_true", help="tiny settings (for tests)")
    d.set_defaults(func=_demo)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None, *, verb: str = "") -> str:
    return f"tensorcut{' ' + verb if verb else ''}: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns the exit status.

    No verb: the usage line and "choose a verb" on stderr, status 2 (argparse's convention).
    A closed output pipe (``tensorcut inspect resnet20 | head``) ends quietly.
    """
    from tensorcut.console import ensure_console

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_usage(sys.stderr)
        print("tensorcut: error: choose a verb (tensorcut --help lists them)", file=sys.stderr)
        return 2
    ensure_console()
    old_format = warnings.formatwarning
    warnings.formatwarning = functools.partial(_one_line_warning, verb=args.command)
    try:
        return int(args.func(args) or 0)
    except TensorcutError as e:
        print(f"tensorcut {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tensorcut {args.command}: interrupted; finished outputs are kept, re-run to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a reader that stopped early
    finally:
        warnings.formatwarning = old_format


def _quiet_stdout() -> None:
    """After the reader of stdout went away: point stdout at /dev/null so the exit flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (a test's capture)
        pass


if __name__ == "__main__":
    raise SystemExit(main())
