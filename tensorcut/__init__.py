"""tensorcut: tensor-network compression of convolutional networks.

Public API (explicit): models, data, checkpoints, training and inspection. Submodules
hold the rest: ``tensorcut.decompose`` (tensor math), ``tensorcut.layers`` (factorized
modules), ``tensorcut.analysis`` (truncation study).
"""

__version__ = "0.1.0"

from tensorcut.data import dataset_info, list_datasets, load_dataset, make_loader
from tensorcut.errors import ConvergenceError, TensorcutError
from tensorcut.io import Checkpoint, load, load_checkpoint, save
from tensorcut.models import create as create_model
from tensorcut.models import list_models
from tensorcut.summary import summarize as inspect
from tensorcut.train.api import evaluate
from tensorcut.train.loop import FitConfig, fit

__all__ = [
    "__version__",
    "Checkpoint",
    "ConvergenceError",
    "FitConfig",
    "TensorcutError",
    "create_model",
    "dataset_info",
    "evaluate",
    "fit",
    "inspect",
    "list_datasets",
    "list_models",
    "load",
    "load_checkpoint",
    "load_dataset",
    "make_loader",
    "save",
]
