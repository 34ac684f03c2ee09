"""Training and evaluation: loader-level loops and the `train` verb."""

from tensorcut.train.api import train
from tensorcut.train.loop import (
    OPTIMIZERS,
    SCHEDULERS,
    FitConfig,
    evaluate,
    fit,
    recalibrate_bn,
    resolve_device,
    set_seed,
)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "FitConfig",
    "evaluate",
    "fit",
    "recalibrate_bn",
    "resolve_device",
    "set_seed",
    "train",
]
