"""Named :class:`~tensorcut.train.config.FitConfig` presets: the thesis's fine-tuning recipe and
the RSDTR paper's (``tensorcut finetune --recipe NAME``), looked up with :func:`get_recipe`.
"""

from __future__ import annotations

import copy

from tensorcut.errors import TensorcutError
from tensorcut.train.config import FitConfig

__all__ = ["FINETUNE_RECIPE", "RECIPES", "RSDTR_RECIPE", "get_recipe", "list_recipes"]

#: The thesis's fine-tuning recipe: Adam, lr 1e-5, early stopping on validation loss
#: (patience 3), <= 50 epochs.
FINETUNE_RECIPE = FitConfig(epochs=50, optimizer="adam", lr=1e-5, scheduler="none", patience=3)

#: The RSDTR paper's fine-tuning schedule (Gabor & Zdunek 2024), with the values of the authors'
#: CIFAR-10 script (``cifar.py -mode fine_tune`` and its README example): SGD with momentum 0.9
#: and weight decay 1e-4, a one-cycle learning rate peaking at 0.01, 160 epochs (batch 128, the
#: CLI's default), no early stopping. The one-cycle schedule also cycles momentum
#: (0.95 -> 0.85 -> 0.95), as ``OneCycleLR`` does for the authors; unlike theirs, our SGD uses
#: Nesterov momentum. Fine-tuning starts from the decomposed factors.
RSDTR_RECIPE = FitConfig(
    epochs=160,
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
    scheduler="onecycle",
    patience=None,
)

#: Named fine-tuning recipes (``tensorcut finetune --recipe NAME``).
RECIPES: dict[str, FitConfig] = {"thesis": FINETUNE_RECIPE, "rsdtr": RSDTR_RECIPE}


def list_recipes() -> list[str]:
    """The names of the presets, in the order the CLI lists them.

    Returns:
        ``["thesis", "rsdtr"]``.

    Example:
        >>> list_recipes()
        ['thesis', 'rsdtr']
    """
    return list(RECIPES)


def get_recipe(name: str) -> FitConfig:
    """A fresh copy of preset ``name`` (changing it leaves the preset as it was).

    Args:
        name: ``thesis`` or ``rsdtr``.

    Returns:
        The recipe, a new :class:`~tensorcut.train.config.FitConfig`.

    Raises:
        TensorcutError: an unknown name, with the names to choose from.

    Example:
        >>> get_recipe("rsdtr").scheduler
        'onecycle'
    """
    if name not in RECIPES:
        raise TensorcutError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return copy.deepcopy(RECIPES[name])
