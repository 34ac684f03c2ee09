"""The training recipe: :class:`FitConfig`, its choices (:data:`OPTIMIZERS`, :data:`SCHEDULERS`)
and the one table of numeric bounds (:func:`check_numbers`) that every verb shares.

Each field carries its own help (``metadata["help"]``, and ``metadata["none"]``: what a default of
``None`` means) and its choices (a ``Literal`` type), so the CLI derives its flags from the class
(:func:`tensorcut.cli.flags.add_dataclass_flags`) and a recipe built in Python is refused in the
CLI's words.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from tensorcut.errors import TensorcutError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "FitConfig",
    "Optimizer",
    "Scheduler",
    "check_numbers",
]

#: the optimisers :func:`~tensorcut.train.loop.fit` builds
Optimizer = Literal["adam", "sgd"]
#: the learning-rate schedules (``none``: a constant rate)
Scheduler = Literal["plateau", "cosine", "onecycle", "none"]
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)
SCHEDULERS: tuple[str, ...] = typing.get_args(Scheduler)

#: Bounds of numeric options: name -> (test, what it must be). One table for every verb
#: and for FitConfig, so a recipe built in Python is refused in the CLI's words.
_NUMBER_RULES: dict[str, tuple[Any, str]] = {
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 0, ">= 0"),
    "lr": (lambda v: v > 0 and math.isfinite(v), "> 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0 and math.isfinite(v), ">= 0"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "patience": (lambda v: v >= 0, ">= 0 (0 turns early stopping off)"),
    "width": (lambda v: v > 0 and math.isfinite(v), "> 0"),
    "val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "subset": (lambda v: v >= 1, ">= 1"),
    "distill_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "input_size": (lambda v: v >= 1, ">= 1"),
    "in_channels": (lambda v: v >= 1, ">= 1"),
    "num_classes": (lambda v: v >= 1, ">= 1"),
}


def check_numbers(**values: float | int | None) -> None:
    """Refuse, in one line naming the option, a numeric option out of its range.

    Args:
        values: option name (``batch_size``, ``lr``, ...; a field of the one rule table) ->
            value, ``None`` for an option that was not given.

    Raises:
        TensorcutError: the first value out of its range, in the CLI's words.
        KeyError: a name the table has no rule for.

    Example:
        >>> check_numbers(lr=0.1, subset=None)
        >>> check_numbers(lr=0)
        Traceback (most recent call last):
        tensorcut.errors.TensorcutError: --lr must be > 0, got 0
    """
    for name, v in values.items():
        if v is None:
            continue
        test, what = _NUMBER_RULES[name]
        if not test(v):
            raise TensorcutError(f"--{name.replace('_', '-')} must be {what}, got {v:g}")


def _help(text: str, none: str | None = None) -> dict[str, str]:
    """A field's metadata: its help, and what its default ``None`` means."""
    return {"help": text} if none is None else {"help": text, "none": none}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class FitConfig:
    """Training recipe for :func:`~tensorcut.train.loop.fit`, validated when built.

    Defaults follow Singh et al. (Adam; lr 0.01 in the paper, 1e-3 is safer for small runs).
    ``patience=0`` (like ``None``) turns early stopping off and is stored as ``None``; a
    ``grad_clip`` of 0 (like ``None``) does not clip. The named presets are in
    :mod:`tensorcut.train.recipes`.

    Args:
        epochs, optimizer, lr, momentum, weight_decay, scheduler, ...: see the fields (each
            field's ``metadata["help"]`` says what it does).

    Raises:
        TensorcutError: an unknown optimizer or scheduler, or a value out of range.

    Example:
        >>> import tensorcut as tc
        >>> cfg = tc.FitConfig(epochs=5, optimizer="sgd", lr=0.05, momentum=0.9)
        >>> tc.FitConfig(patience=0).patience is None
        True
    """

    epochs: int = field(default=10, metadata=_help("training epochs"))
    optimizer: Optimizer = field(default="adam", metadata=_help("optimiser"))
    lr: float = field(default=1e-3, metadata=_help("learning rate, the peak for onecycle"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum, in [0, 1)"))
    weight_decay: float = field(default=0.0, metadata=_help("L2 weight decay, >= 0"))
    scheduler: Scheduler = field(default="plateau", metadata=_help("learning-rate schedule"))
    patience: int | None = field(
        default=None,
        metadata=_help(
            "stop after this many epochs without a better validation loss; 0: no early stopping",
            none="no early stopping",
        ),
    )
    distill_alpha: float = field(
        default=0.0,
        metadata=_help(
            "weight of the teacher's soft targets in the loss (with --distill-from), in [0, 1]"
        ),
    )
    distill_temperature: float = field(
        default=4.0,
        metadata=_help(
            "softmax temperature of the teacher's and the student's logits in the "
            "distillation loss (with --distill-from), > 0"
        ),
    )
    seed: int = field(
        default=0, metadata=_help("random seed of the initial weights, data split and shuffling")
    )
    grad_clip: float | None = field(
        default=None,
        metadata=_help(
            "clip the gradients' norm to this value; 0: no clipping", none="no clipping"
        ),
    )
    amp: bool = field(
        default=False,
        metadata=_help("mixed precision (float16 + loss scaling on CUDA, bfloat16 on CPU)"),
    )
    sync_batchnorm: bool = field(
        default=False, metadata=_help("SyncBatchNorm across torchrun ranks (CUDA only)")
    )

    def __post_init__(self) -> None:
        """Refuse a recipe the loop cannot run, in the CLI's words (one rule table for both)."""
        for name in ("epochs", "seed"):
            v = getattr(self, name)
            if not _is_int(v):
                raise TensorcutError(f"{name} must be an integer, got {v!r}")
        for name in ("lr", "momentum", "weight_decay", "distill_alpha", "distill_temperature"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise TensorcutError(f"{name} must be a number, got {v!r}")
        if self.patience is not None and not _is_int(self.patience):
            raise TensorcutError(
                f"patience must be an integer >= 0 or None (0 or None: no early stopping), got "
                f"{self.patience!r}"
            )
        check_numbers(
            epochs=self.epochs,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            seed=self.seed,
            patience=self.patience,
        )
        if self.patience == 0:
            self.patience = None  # one spelling of "no early stopping"
        if self.optimizer not in OPTIMIZERS:
            raise TensorcutError(
                f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"
            )
        if self.scheduler not in SCHEDULERS:
            raise TensorcutError(
                f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}"
            )
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise TensorcutError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise TensorcutError(
                f"distill_temperature must be > 0, got {self.distill_temperature:g}"
            )
        if self.grad_clip is not None and not (
            isinstance(self.grad_clip, (int, float)) and self.grad_clip >= 0
        ):
            raise TensorcutError(
                f"grad_clip must be >= 0 (0 or None: no clipping), got {self.grad_clip!r}"
            )
