"""Training and evaluation: loader-level loops and the `train` verb (train_checkpoint)."""

from tensorcut.train.api import train_checkpoint
from tensorcut.train.callbacks import Callback, Checkpoint, EarlyStopping, FitState
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
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "FitConfig",
    "FitState",
    "evaluate",
    "fit",
    "recalibrate_bn",
    "resolve_device",
    "set_seed",
    "train_checkpoint",
]
