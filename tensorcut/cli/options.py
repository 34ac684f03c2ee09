"""CLI flags derived from the typed config dataclasses, so every option is reachable from the CLI.

* Each registered method's ``Options`` gives one flag per field, named ``--<method>-<field>``
  (``--cp-n-iter-max 50``, ``--no-tucker2-hooi``, ``--tr-shifts 0 2``);
  :func:`method_options_from_args` turns them back into ``CompressConfig.options``.
* :class:`~tensorcut.train.config.FitConfig` gives the training-recipe flags of ``train`` and
  ``finetune`` (``--epochs``, ``--lr``, ``--optimizer``, ... ``--sync-bn``);
  :func:`fit_config_from_args` lays the given ones over the verb's base recipe.

Both go through :func:`tensorcut.cli.flags.add_dataclass_flags`: a new method, or a new field
on a method's ``Options`` or on ``FitConfig``, needs no CLI code; each field carries its own help
(``metadata["help"]``) and choices (a ``Literal`` type). :data:`FIT_FLAGS` holds only what the
command line alone decides: a flag's user-visible name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from tensorcut.cli.flags import Flag, add_dataclass_flags, given_values
from tensorcut.layers import get_method, list_methods
from tensorcut.train.config import FitConfig, check_numbers

__all__ = [
    "FIT_FLAGS",
    "add_fit_flags",
    "add_method_option_flags",
    "fit_config_from_args",
    "method_options_from_args",
]

_DEST = "method_option__{method}__{{field}}"


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
        if not dataclasses.fields(opts):
            continue
        group = parser.add_argument_group(f"{method} options ({opts.__name__})")
        add_dataclass_flags(group, opts, prefix=f"{method}-", dest=_DEST.format(method=method))


def method_options_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The flags that were given, as ``CompressConfig(options=...)``: ``{method: {field: value}}``.

    Args:
        args: parsed arguments of a parser that :func:`add_method_option_flags` extended.

    Returns:
        Only the methods and fields set on the command line (tuples for multi-value flags).
    """
    out: dict[str, dict[str, Any]] = {}
    for method in list_methods():
        given = given_values(args, get_method(method).Options, _DEST.format(method=method))
        if given:
            out[method] = given
    return out


#: How :class:`FitConfig`'s fields show on the command line where that is not the field itself:
#: ``sync_batchnorm`` keeps its user-visible name ``--sync-bn``; every other flag is the field's
#: name, with the field's help and choices.
FIT_FLAGS: dict[str, Flag] = {"sync_batchnorm": Flag(name="sync-bn")}


def add_fit_flags(
    parser: argparse.ArgumentParser,
    defaults: Callable[[str], str | None],
    *,
    skip: Iterable[str] = (),
) -> dict[str, argparse.Action]:
    """The training-recipe flags, one per :class:`FitConfig` field (an argument group).

    Args:
        parser: the verb's parser (``train``, ``finetune``).
        defaults: the help's default for a field, from the verb's base recipe.
        skip: fields the verb cannot use.
    """
    group = parser.add_argument_group("training recipe (FitConfig)")
    return add_dataclass_flags(group, FitConfig, flags=FIT_FLAGS, skip=skip, defaults=defaults)


def fit_config_from_args(args: argparse.Namespace, base: FitConfig) -> FitConfig:
    """``base`` with every recipe flag that was given applied: a fresh, validated copy.

    A numeric flag out of range is refused in the CLI's words (``--lr must be > 0, got 0``);
    ``--patience 0`` turns early stopping off (as ``FitConfig(patience=0)`` does).

    Args:
        args: parsed arguments of a parser that :func:`add_fit_flags` extended.
        base: the verb's base recipe (not changed).

    Returns:
        The recipe to train with.

    Raises:
        TensorcutError: a value the recipe cannot take.
    """
    given = given_values(args, FitConfig)
    for name, value in given.items():
        with contextlib.suppress(KeyError):  # a field the one rule table has no rule for
            check_numbers(**{name: value})
    return dataclasses.replace(base, **given)
