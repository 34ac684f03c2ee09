"""tensorcut: tensor-network compression of convolutional networks.

The public face, in the order of a user's path::

    import tensorcut as tc

    model = tc.create_model("resnet20", num_classes=10)  # or any nn.Module with Conv2d layers
    model, plan = tc.compress(model, tc.CompressConfig(method="tucker2", ratio=0.3),
                              input_shape=(3, 32, 32))
    tc.fit(model, train_loader, val_loader, tc.FitConfig(epochs=5, lr=1e-4))
    print(tc.evaluate(model, test_loader))
    tc.save(model, "out/")

Subpackages hold the rest: ``tensorcut.compression`` (planning and the swap),
``tensorcut.layers`` (the factorized modules, one method each), ``tensorcut.decompose``
(tensor math), ``tensorcut.train`` (the epoch loop, TDLRT), ``tensorcut.study`` (the
truncation study).
"""

__version__ = "0.1.0"

from tensorcut.checkpoint.io import Checkpoint, load, load_checkpoint, save
from tensorcut.compression import (
    CompressConfig,
    LayerPlan,
    Plan,
    apply,
    compress,
    decompress,
    plan,
)
from tensorcut.data import dataset_info, list_datasets, load_dataset, make_loader
from tensorcut.errors import ConvergenceError, TensorcutError
from tensorcut.layers import list_methods
from tensorcut.models import create as create_model
from tensorcut.models import list_models
from tensorcut.study import analyze
from tensorcut.summary import summarize as inspect
from tensorcut.train.config import FitConfig
from tensorcut.train.loop import evaluate, fit

__all__ = [
    "__version__",
    # compression
    "CompressConfig",
    "LayerPlan",
    "Plan",
    "apply",
    "compress",
    "decompress",
    "list_methods",
    "plan",
    # models and data
    "create_model",
    "dataset_info",
    "list_datasets",
    "list_models",
    "load_dataset",
    "make_loader",
    # training and evaluation
    "FitConfig",
    "evaluate",
    "fit",
    # the truncation study
    "analyze",
    # checkpoints and inspection
    "Checkpoint",
    "inspect",
    "load",
    "load_checkpoint",
    "save",
    # errors
    "ConvergenceError",
    "TensorcutError",
]
