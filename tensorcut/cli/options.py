"""CLI flags derived from typed config dataclasses, so every option is reachable from the CLI.

Each registered method's ``Options`` dataclass gives one flag per field, named
``--<method>-<field>`` (``--cp-n-iter-max 50``, ``--no-tucker2-hooi``, ``--tr-shifts 0 2``);
:func:`method_options_from_args` turns the parsed flags back into ``CompressConfig.options``.
A new method, or a new field on a method's ``Options``, needs no CLI code.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import Field, fields
from typing import Any

from tensorcut.layers import get_method, list_methods

__all__ = ["add_method_option_flags", "method_options_from_args"]

_DEST = "method_option__{method}__{field}"


def _base_type(hint: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, False); ``tuple[int, ...] | None`` -> (int, True)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    t = args[0] if (typing.get_origin(hint) in (typing.Union, types.UnionType) and args) else hint
    if typing.get_origin(t) is tuple:
        inner = [a for a in typing.get_args(t) if a is not Ellipsis]
        return (inner[0] if inner else int), True
    return t, False


def _add_flag(group: Any, method: str, f: Field[Any], hint: Any) -> None:
    base, many = _base_type(hint)
    flag = f"--{method}-{f.name.replace('_', '-')}"
    dest = _DEST.format(method=method, field=f.name)
    text = f.metadata.get("help", f.name)
    if base is bool:
        group.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text
        )
    elif many:
        group.add_argument(
            flag, dest=dest, type=base, nargs="+", default=None, metavar=f.name.upper(), help=text
        )
    else:
        group.add_argument(
            flag, dest=dest, type=base, default=None, metavar=f.name.upper(), help=text
        )


def add_method_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of every registered method's ``Options`` (an argument group each).

    Args:
        parser: the verb's parser (``compress``, ``run``).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_method_option_flags(p)
        >>> method_options_from_args(p.parse_args(["--cp-n-iter-max", "50"]))
        {'cp': {'n_iter_max': 50}}
    """
    for method in list_methods():
        opts = get_method(method).Options
        hints = typing.get_type_hints(opts)
        fs = fields(opts)
        if not fs:
            continue
        group = parser.add_argument_group(f"{method} options ({opts.__name__})")
        for f in fs:
            _add_flag(group, method, f, hints[f.name])


def method_options_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The flags that were given, as ``CompressConfig(options=...)``: ``{method: {field: value}}``.

    Args:
        args: parsed arguments of a parser that :func:`add_method_option_flags` extended.

    Returns:
        Only the methods and fields set on the command line (tuples for multi-value flags).
    """
    out: dict[str, dict[str, Any]] = {}
    for method in list_methods():
        for f in fields(get_method(method).Options):
            v = getattr(args, _DEST.format(method=method, field=f.name), None)
            if v is not None:
                out.setdefault(method, {})[f.name] = tuple(v) if isinstance(v, list) else v
    return out
