"""CLI flags derived from the typed config dataclasses, so every option is reachable from the CLI.

* Each registered method's ``Options`` gives one flag per field, named ``--<method>-<field>``
  (``--cp-n-iter-max 50``, ``--no-tucker2-hooi``, ``--tr-shifts 0 2``);
  :func:`method_options_from_args` turns them back into ``CompressConfig.options``.
* :class:`~tensorcut.train.loop.FitConfig` gives the training-recipe flags of ``train`` and
  ``finetune`` (``--epochs``, ``--lr``, ``--optimizer``, ... ``--sync-bn``);
  :func:`fit_config_from_args` lays the given ones over the verb's base recipe.

Both go through :func:`tensorcut.cli.flags.add_dataclass_flags`: a new method, or a new field
on a method's ``Options`` or on ``FitConfig``, needs no CLI code (a ``FitConfig`` field only a
help line in :data:`FIT_FLAGS`, since that class carries none of its own).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from tensorcut.cli.flags import Flag, add_dataclass_flags, given_values
from tensorcut.errors import TensorcutError
from tensorcut.layers import get_method, list_methods
from tensorcut.train.loop import OPTIMIZERS, SCHEDULERS, FitConfig, check_numbers

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


#: How :class:`FitConfig`'s fields show on the command line. ``sync_batchnorm`` keeps its
#: user-visible name ``--sync-bn``; every other flag is the field's name.
FIT_FLAGS: dict[str, Flag] = {
    "epochs": Flag(help="training epochs"),
    "optimizer": Flag(help="optimiser", choices=OPTIMIZERS),
    "lr": Flag(help="learning rate, the peak for onecycle"),
    "momentum": Flag(help="SGD momentum, in [0, 1)"),
    "weight_decay": Flag(help="L2 weight decay, >= 0"),
    "scheduler": Flag(help="learning-rate schedule", choices=SCHEDULERS),
    "patience": Flag(
        help="stop after this many epochs without a better validation loss; 0: no early stopping",
        none_text="no early stopping",
    ),
    "distill_alpha": Flag(
        help="weight of the teacher's soft targets in the loss (with --distill-from), in [0, 1]"
    ),
    "distill_temperature": Flag(
        help="softmax temperature of the teacher's and the student's logits in the "
        "distillation loss (with --distill-from), > 0"
    ),
    "seed": Flag(help="random seed of the initial weights, data split and shuffling"),
    "grad_clip": Flag(
        help="clip the gradients' norm to this value; 0: no clipping", none_text="no clipping"
    ),
    "amp": Flag(help="mixed precision (float16 + loss scaling on CUDA, bfloat16 on CPU)"),
    "sync_batchnorm": Flag(name="sync-bn", help="SyncBatchNorm across torchrun ranks (CUDA only)"),
}


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
    ``--patience 0`` turns early stopping off.

    Raises:
        TensorcutError: a value the recipe cannot take.
    """
    given = given_values(args, FitConfig)
    if "patience" in given:  # FitConfig takes None for no early stopping; the CLI takes 0
        p = given["patience"]
        if p < 0:
            raise TensorcutError(f"--patience must be >= 0 (0 turns early stopping off), got {p}")
        given["patience"] = p or None
    for name, value in given.items():
        with contextlib.suppress(KeyError):  # a field the one rule table has no rule for
            check_numbers(**{name: value})
    return dataclasses.replace(base, **given)
