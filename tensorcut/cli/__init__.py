"""Command-line entry point: every verb is a thin argparse layer over a Python function.

The verb table is ``COMMAND_MODULES``: each module of this package (``train``, ``study``,
``workflow``, ``run``) exposes ``add_commands(subparsers)`` and maps its flags onto the API;
:mod:`tensorcut.cli.options` derives the method-option flags from the layers' ``Options``;
:mod:`tensorcut.cli.reference` generates ``docs/cli.md``. Nothing outside this package imports
it. Bad input (:class:`TensorcutError`) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import sys
import warnings
from pathlib import Path

from tensorcut.errors import TensorcutError

COMMAND_MODULES: tuple[str, ...] = (
    "tensorcut.cli.train",
    "tensorcut.cli.study",
    "tensorcut.cli.workflow",
    "tensorcut.cli.run",
)


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help.

    Not when the help already speaks of the default, or there is none.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (
            d is None
            or d is False
            or d is argparse.SUPPRESS
            or "default" in text.lower()
            or "%(default)" in text
            or not (
                action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
            )
        ):
            return text
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


def set_formatter(parser: argparse.ArgumentParser, width: int | None = None) -> None:
    """Use :class:`HelpFormatter` on ``parser`` and every verb's parser.

    ``width`` fixes the line width (None: the terminal's).
    """
    fmt = HelpFormatter if width is None else functools.partial(HelpFormatter, width=width)
    parser.formatter_class = fmt
    for p in verb_parsers(parser).values():
        p.formatter_class = fmt


def verb_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of each verb, by name."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _inspect(args: argparse.Namespace) -> int:
    from tensorcut import data as tdata
    from tensorcut import models
    from tensorcut.checkpoint import io as tio
    from tensorcut.console import print_json
    from tensorcut.summary import summarize

    if args.list:
        if args.json:
            print_json({n: models.model_entry(n).description for n in models.list_models()})
            return 0
        for name in models.list_models():
            print(f"{name:12s} {models.model_entry(name).description}")
        return 0
    if not args.target:
        raise TensorcutError("give a checkpoint directory or a model name (or --list)")
    if Path(args.target).is_dir():
        ck = tio.load_checkpoint(args.target)
        spec = ck.info.model
        model, kw = ck.model, spec.kwargs
        title = f"{args.target} ({spec.name})"
    else:
        from tensorcut.train.api import check_model_size

        kw = {
            "num_classes": args.num_classes,
            "in_channels": args.in_channels,
            "width": args.width,
            "input_size": args.input_size,
        }
        if args.dataset:
            info = tdata.dataset_info(args.dataset)
            kw.update(
                num_classes=info.num_classes,
                in_channels=info.in_channels,
                input_size=info.image_size,
            )
        check_model_size(args.target, kw)
        model = models.create(args.target, **kw)
        title = args.target
    from tensorcut.train.api import check_input_size

    size = int(kw.get("input_size", args.input_size))
    shape = (int(kw.get("in_channels", 3)), size, size)
    check_input_size(model, shape)
    if args.latency and (args.batch < 1 or (args.threads is not None and args.threads < 1)):
        raise TensorcutError("--batch and --threads must be >= 1")
    s = summarize(model, shape)
    lat = None
    if args.latency:
        from tensorcut.summary import measure_model_latency

        lat = measure_model_latency(model, shape, batch=args.batch, threads=args.threads)
    if args.json:
        out = s.to_dict()
        if lat is not None:
            out["latency"] = lat.to_dict()
        print_json(out)
    else:
        print(title)
        print(s.table())
        for line in lat.lines() if lat is not None else []:
            print(line)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tensorcut.pipeline.demo import run_demo

    return run_demo(args.out, fast=args.fast, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    """The full parser (also used to generate the CLI reference)."""
    from tensorcut import __version__
    from tensorcut.cli.flags import add_out

    parser = argparse.ArgumentParser(
        prog="tensorcut",
        description="Compress CNNs with tensor-network decompositions of their kernels.",
    )
    parser.add_argument("--version", action="version", version=f"tensorcut {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="VERB")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).add_commands(sub)
    i = sub.add_parser(
        "inspect",
        help="table of conv / linear layers: shapes, params, MACs, ranks",
        description="List every conv and linear layer of a checkpoint or a zoo model.",
    )
    i.add_argument("target", nargs="?", help="checkpoint directory or zoo model name")
    i.add_argument("--list", action="store_true", help="list zoo models")
    i.add_argument(
        "--dataset",
        default=None,
        help="size the zoo model for this data set (classes, channels, input size)",
    )
    i.add_argument(
        "--num-classes", type=int, default=10, help="classes of a zoo model (without --dataset)"
    )
    i.add_argument(
        "--in-channels",
        type=int,
        default=3,
        help="input channels of a zoo model (without --dataset)",
    )
    i.add_argument(
        "--input-size",
        type=int,
        default=32,
        help="input height = width of a zoo model, pixels (without --dataset)",
    )
    i.add_argument(
        "--width", type=float, default=1.0, help="channel width multiplier of a zoo model"
    )
    i.add_argument(
        "--latency",
        action="store_true",
        help="also time the model on this machine (warm-up, interleaved rounds, median and IQR; "
        "a compressed model is compared with its dense equivalent)",
    )
    i.add_argument("--batch", type=int, default=1, help="batch size for --latency")
    i.add_argument(
        "--threads", type=int, default=None, help="CPU threads for --latency (default: PyTorch's)"
    )
    i.add_argument("--json", action="store_true", help="print the table as JSON")
    i.set_defaults(func=_inspect)
    d = sub.add_parser(
        "demo",
        help="the main job on the embedded digits data",
        description="Run the demo pipeline.",
    )
    add_out(d, "run", default="demo-out")
    d.add_argument("--fast", action="store_true", help="tiny settings (for tests)")
    d.add_argument(
        "--json",
        action="store_true",
        help="print the verification summary as JSON (progress goes to stderr)",
    )
    d.set_defaults(func=_demo)
    set_formatter(parser)
    return parser


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
    *,
    verb: str = "",
) -> str:
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
    from tensorcut import console

    ensure_console()
    old_format = warnings.formatwarning
    warnings.formatwarning = functools.partial(_one_line_warning, verb=args.command)
    try:
        from tensorcut.cli.flags import check_out

        check_out(args)  # a file given for a folder, or a folder for a file: before any work
        if getattr(
            args, "json", False
        ):  # stdout holds the JSON result alone; progress and tables go to stderr
            console.JSON_STREAM = sys.stdout
            with contextlib.redirect_stdout(sys.stderr):
                rc = int(args.func(args) or 0)
        else:
            rc = int(args.func(args) or 0)
        # a closed pipe shows here, inside the handler below, not at interpreter exit
        sys.stdout.flush()
        return rc
    except TensorcutError as e:
        print(f"tensorcut {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"tensorcut {args.command}: interrupted; finished outputs are kept, re-run to resume",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a reader that stopped early
    finally:
        warnings.formatwarning = old_format
        console.JSON_STREAM = None


def _quiet_stdout() -> None:
    """After the reader of stdout went away: point stdout at /dev/null.

    So the flush at interpreter exit cannot fail again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (a test's capture)
        pass


if __name__ == "__main__":
    raise SystemExit(main())
