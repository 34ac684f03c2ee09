"""Generate the CLI reference (docs/cli.md) from the argument parser, so docs never drift.

``python -m tensorcut.cli.reference > docs/cli.md``; a test checks the file is current.
"""

from __future__ import annotations

import argparse


def cli_reference() -> str:
    """Markdown: one section per verb with its full ``--help`` text."""
    from tensorcut.cli import build_parser, set_formatter

    parser = build_parser()
    set_formatter(parser, width=100)  # a fixed width: the file does not depend on the terminal
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = [
        "# tensorcut command-line reference",
        "",
        "Generated from the parser by `python -m tensorcut.cli.reference > docs/cli.md`; "
        "do not edit by hand.",
        "",
        "Bad input prints one line `tensorcut VERB: error: ...` and exits with status 2.",
        "",
    ]
    for name, p in sub.choices.items():
        out += [f"## `tensorcut {name}`", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(cli_reference(), end="")
