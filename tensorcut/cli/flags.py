"""Flags derived from config dataclasses, and the one declaration of ``--out``.

:func:`add_dataclass_flags` gives each field of a dataclass one flag: its type (several values
for a tuple), choices from a ``Literal`` type (or ``metadata["choices"]``), ``--x/--no-x`` for a
boolean, help from the field's ``metadata["help"]`` (what a default of ``None`` means:
``metadata["none"]``). A caller's :class:`Flag` table overrides what the command line alone
needs (a flag's user-visible name). A flag not given stays ``None``,
so :func:`given_values` returns exactly what the command line set, and a verb lays that over its
base config (a named recipe, the recorded run, the class defaults). The help says the default
through the verb's ``defaults`` callback, because only the verb knows its base.

:func:`add_out` declares ``--out`` as one of a few kinds (:data:`OUT_KINDS`): one help wording
and one check of the path per kind (:func:`check_out`, which ``main`` runs before any verb).
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from tensorcut.errors import TensorcutError

__all__ = [
    "OUT_KINDS",
    "Flag",
    "OutKind",
    "add_dataclass_flags",
    "add_out",
    "check_out",
    "default_text",
    "describe",
    "given_values",
    "refuse_path_kind",
]


@dataclass(frozen=True)
class Flag:
    """How one field shows on the command line, where that differs from what is derived.

    Attributes:
        name: the flag without ``--`` and prefix (default: the field name, ``_`` -> ``-``).
        help: help text (default: the field's ``metadata["help"]``, else its name).
        metavar: the value's name in the usage (default: the field name in capitals).
        choices: the allowed values (default: a ``Literal`` type's or ``metadata["choices"]``,
            else any).
        type: converts one command-line word (default: the field's scalar type).
        none_text: how the help names a default of ``None`` (default: the field's
            ``metadata["none"]``, e.g. "no early stopping"; else "none").
    """

    name: str | None = None
    help: str | None = None
    metavar: str | None = None
    choices: Sequence[Any] | None = None
    type: Callable[[str], Any] | None = None
    none_text: str | None = None


def _scalar(hint: Any) -> tuple[Any, bool, tuple[Any, ...] | None]:
    """(scalar type, several values?, choices) of a field type.

    ``int | None`` -> (int, False, None); ``tuple[float, ...]`` -> (float, True, None);
    ``Literal["a", "b"] | None`` -> (str, False, ("a", "b")).
    """
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    many = typing.get_origin(hint) is tuple
    if many:
        inner = [a for a in typing.get_args(hint) if a is not Ellipsis]
        hint = inner[0] if inner else str
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), many, choices
    return hint, many, None


def describe(value: Any, none_text: str | None = None) -> str:
    """A default as the help shows it: ``1e-5``, ``on``, ``OUT IN``, ``none``."""
    if value is None:
        return none_text or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}".replace("e-0", "e-").replace("e+0", "e+")
    if isinstance(value, (tuple, list)):
        return " ".join(describe(v) for v in value)
    return str(value)


def default_text(cls: type, name: str, flags: Mapping[str, Flag] | None = None) -> str:
    """Field ``name``'s class default as the help shows it (``None`` in the field's words).

    Args:
        cls: the config dataclass (its default must be constructible with no arguments).
        name: the field.
        flags: per-field :class:`Flag` overrides (their ``none_text`` wins).

    Returns:
        The text, e.g. ``1e-3``, ``plateau``, ``no early stopping``.

    Example:
        >>> @dataclass
        ... class C:
        ...     lr: float = 1e-3
        >>> default_text(C, "lr")
        '0.001'
    """
    spec = (flags or {}).get(name, Flag())
    about = {f.name: f.metadata for f in fields(cls)}[name]
    return describe(getattr(cls(), name), spec.none_text or about.get("none"))


def add_dataclass_flags(
    target: Any,
    cls: type,
    *,
    prefix: str = "",
    dest: str = "{field}",
    flags: Mapping[str, Flag] | None = None,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    defaults: Callable[[str], str | None] | None = None,
) -> dict[str, argparse.Action]:
    """One flag per field of dataclass ``cls``, each ``None`` unless given.

    Args:
        target: a parser, argument group or mutually exclusive group.
        cls: the config dataclass.
        prefix: put before each flag name (``"cp-"`` gives ``--cp-n-iter-max``).
        dest: the attribute each value lands in, ``{field}`` standing for the field name.
        flags: per-field :class:`Flag` overrides (user-visible names, help, choices).
        only: these fields alone, in this order (default: all, in field order).
        skip: fields that get no flag.
        defaults: the default's text for a field (None: say nothing), shown as
            ``(default: TEXT)``; it depends on the verb's base config.

    Returns:
        The added actions, by field name.

    Example:
        >>> @dataclass
        ... class C:
        ...     n: int = 3
        ...     fast: bool = False
        >>> p = argparse.ArgumentParser()
        >>> sorted(add_dataclass_flags(p, C))
        ['fast', 'n']
        >>> given_values(p.parse_args(["--n", "5", "--no-fast"]), C)
        {'n': 5, 'fast': False}
    """
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    names = list(only) if only is not None else list(by_name)
    unknown = [n for n in [*names, *skip, *(flags or {})] if n not in by_name]
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
    out: dict[str, argparse.Action] = {}
    for name in names:
        if name in skip:
            continue
        spec = (flags or {}).get(name, Flag())
        base, many, choices = _scalar(hints[name])
        about = by_name[name].metadata
        choices = choices if choices is not None else about.get("choices")
        text = spec.help or about.get("help") or name.replace("_", " ")
        shown = defaults(name) if defaults else None
        if shown is not None:
            text = f"{text} (default: {shown})"
        kw: dict[str, Any] = {
            "dest": dest.format(field=name),
            "default": None,
            "help": text.replace("%", "%%"),
        }
        flag = f"--{prefix}{spec.name or name.replace('_', '-')}"
        if base is bool and not many:
            out[name] = target.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        kw["type"] = spec.type or base
        kw["choices"] = spec.choices if spec.choices is not None else choices
        if kw["choices"] is None:
            kw["metavar"] = spec.metavar or name.upper()
        elif spec.metavar:
            kw["metavar"] = spec.metavar
        if many:
            kw["nargs"] = "+"
        out[name] = target.add_argument(flag, **kw)
    return out


def given_values(args: argparse.Namespace, cls: type, dest: str = "{field}") -> dict[str, Any]:
    """The fields of ``cls`` that the command line set (several values as a tuple).

    Args:
        args: parsed arguments of a parser that :func:`add_dataclass_flags` extended.
        cls: the same dataclass.
        dest: the same ``dest`` pattern.
    """
    out: dict[str, Any] = {}
    for f in fields(cls):
        v = getattr(args, dest.format(field=f.name), None)
        if v is not None:
            out[f.name] = tuple(v) if isinstance(v, list) else v
    return out


# ------------------------------------------------------------------------------------------ --out


@dataclass(frozen=True)
class OutKind:
    """What one kind of ``--out`` names: the usage's word, the help's wording, file or folder."""

    metavar: str
    what: str
    directory: bool


#: The kinds of ``--out``: a verb writes a checkpoint, a run, a results file, figures or a file.
OUT_KINDS: dict[str, OutKind] = {
    "checkpoint": OutKind(
        "DIR", "checkpoint directory to write; refused if it holds one, unless {unless}", True
    ),
    "run": OutKind("RUN_DIR", "run directory to write; a run already there is resumed", True),
    "results": OutKind(
        "RESULTS", "SQLite results file to write; results already there are resumed", False
    ),
    "figures": OutKind("FIGDIR", "folder to write the figure files into", True),
    "file": OutKind("FILE", "file to write", False),
}


def add_out(
    parser: argparse.ArgumentParser,
    kind: str,
    *,
    required: bool = False,
    default: str | None = None,
    unless: str = "--force",
    note: str | None = None,
    group: Any = None,
) -> argparse.Action:
    """Declare the verb's ``--out`` as one of :data:`OUT_KINDS`.

    Args:
        parser: the verb's parser (it records the kind for :func:`check_out`).
        kind: ``checkpoint``, ``run``, ``results``, ``figures`` or ``file``.
        required: whether the verb needs it.
        default: where it goes when not given.
        unless: for a checkpoint, the flag that lets it replace (or resume) one already there.
        note: what else the help must say, after the kind's wording.
        group: a (mutually exclusive) group of ``parser`` to add it to.
    """
    k = OUT_KINDS[kind]
    text = k.what.format(unless=unless) + (f"; {note}" if note else "")
    parser.set_defaults(out_kind=kind)
    return (group or parser).add_argument(
        "--out", required=required, default=default, metavar=k.metavar, help=text
    )


def refuse_path_kind(path: str | Path | None, directory: bool, flag: str) -> None:
    """Refuse, in one line, a file where a folder is asked for (or a folder for a file)."""
    if path is None or str(path) == "":
        return
    p = Path(path)
    if directory and p.is_file():
        raise TensorcutError(f"{path} is a file; give a directory path for {flag}")
    if not directory and p.is_dir():
        raise TensorcutError(f"{path} is a directory; give a file path for {flag}")


def check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` of the wrong kind (a file for a folder, a folder for a file)."""
    kind = getattr(args, "out_kind", None)
    if kind is not None:
        refuse_path_kind(getattr(args, "out", None), OUT_KINDS[kind].directory, "--out")
