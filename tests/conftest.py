"""Shared fixtures: tiny data files in each on-disk format, and a small trained checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from formats_util import write_idx

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test, restored afterwards. Tiny tensors gain nothing from threads,
    and on a shared 2-core machine OpenMP spinning makes them many times slower. Modules of tiny
    tensor tests use ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """A miniature Fashion-MNIST in IDX format (50 train, 20 test images)."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), gz=False)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-reduced vanilla-cnn trained for one epoch on a digits subset."""
    from tensorcut.train.api import train_checkpoint
    from tensorcut.train.config import FitConfig

    out = tmp_path_factory.mktemp("ck") / "dense"
    train_checkpoint(
        "vanilla-cnn",
        "digits",
        out,
        epochs=1,
        width=0.125,
        batch_size=64,
        config=FitConfig(epochs=1, lr=2e-3),
        subset=256,
        device="cpu",
        progress=False,
    )
    return out
