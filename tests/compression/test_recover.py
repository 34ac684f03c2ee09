"""Layer matching before fine-tuning (``compression/recover.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tensorcut.compression import CompressConfig, compress
from tensorcut.compression.recover import match_layers
from tensorcut.errors import TensorcutError
from tensorcut.layers import list_methods

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1),
    ).eval()


def _loader(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, 8, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=16)


def _small(dense: nn.Module, method: str) -> nn.Module:
    small, _ = compress(
        copy.deepcopy(dense),
        CompressConfig(method=method, ratio=0.3),
        input_shape=(4, 8, 8),
        progress=False,
    )
    return small


@pytest.mark.parametrize("method", list_methods())
def test_matching_lowers_the_layer_error_and_touches_only_the_factors(method: str) -> None:
    dense = _net()
    small = _small(dense, method)
    dense_before = copy.deepcopy(dense.state_dict())
    other = {
        k: v.clone() for k, v in small.state_dict().items() if "running" in k or k.startswith("1.")
    }
    res = match_layers(small, dense, _loader(), epochs=3, lr=3e-3, progress=False)
    assert res["steps"] == 12  # 3 passes x 4 batches
    assert res["after"] < res["before"]
    # the reference is untouched, and so are the compressed model's non-factor tensors
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in dense_before.items())
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in other.items())
    assert all(p.grad is None for n, p in small.named_parameters() if n.startswith("1."))
    assert all(p.requires_grad for p in small.parameters())  # restored
    assert not small.training


def test_max_batches_bounds_the_steps() -> None:
    dense = _net()
    small = _small(dense, "tucker2")
    res = match_layers(small, dense, _loader(), epochs=2, max_batches=1, progress=False)
    assert res["steps"] == 2


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
    ],
)
def test_bad_arguments_are_one_line(kw: dict, msg: str) -> None:
    dense = _net()
    with pytest.raises(TensorcutError) as e:
        match_layers(_small(dense, "tucker2"), dense, _loader(), progress=False, **kw)
    assert str(e.value) == msg


def test_an_uncompressed_model_or_a_wrong_reference_is_refused() -> None:
    dense = _net()
    with pytest.raises(TensorcutError, match="no factorized layer to match"):
        match_layers(copy.deepcopy(dense), dense, _loader(), progress=False)
    other = nn.Sequential(nn.Conv2d(4, 8, 3))
    with pytest.raises(TensorcutError, match="reference model has no Conv2d of that name"):
        match_layers(_small(dense, "tucker2"), other, _loader(), progress=False)


def test_an_empty_loader_is_refused() -> None:
    dense = _net()
    with pytest.raises(TensorcutError, match="got no batches"):
        match_layers(_small(dense, "tucker2"), dense, [], progress=False)
