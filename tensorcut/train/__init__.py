"""Training and evaluation: loader-level loops and the `train` verb (train_checkpoint)."""

from tensorcut.train.api import train_checkpoint
from tensorcut.train.callbacks import Callback, Checkpoint, EarlyStopping, FitState
from tensorcut.train.config import OPTIMIZERS, SCHEDULERS, FitConfig
from tensorcut.train.loop import evaluate, fit, recalibrate_bn, resolve_device, set_seed
from tensorcut.train.recipes import get_recipe, list_recipes
from tensorcut.train.steps import BackpropStep, TrainStep

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "BackpropStep",
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "FitConfig",
    "FitState",
    "TrainStep",
    "evaluate",
    "fit",
    "get_recipe",
    "list_recipes",
    "recalibrate_bn",
    "resolve_device",
    "set_seed",
    "train_checkpoint",
]
