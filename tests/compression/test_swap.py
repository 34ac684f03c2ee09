"""The swap and its inverse (``compression/swap.py``): apply, compress, decompress."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tensorcut.compression import CompressConfig, apply, compress, decompress, plan
from tensorcut.errors import TensorcutError
from tensorcut.layers import FactorizedConv2d, list_methods

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py

TOL = 1e-5  # float32 outputs of O(1): a few hundred ulps of summation-order difference


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 12, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(12, 8, 1),
    ).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", list_methods())
def test_apply_then_decompress_gives_the_factorized_output_as_dense_convs(method: str) -> None:
    """decompress is the exact inverse of the swap: the dense model computes what the factorized
    one does, and at rank='full' what the original did."""
    ref = _net()
    x = _x()
    with torch.no_grad():
        y = ref(x)
    model = copy.deepcopy(ref)
    p = plan(model, method=method, rank="full", input_shape=(4, 8, 8), progress=False)
    apply(model, p)
    swapped = [m for m in model.modules() if isinstance(m, FactorizedConv2d)]
    assert len(swapped) == sum(e.status == "factorize" for e in p.layers) >= 1
    with torch.no_grad():
        y_fact = model(x)
    torch.testing.assert_close(y_fact, y, atol=TOL, rtol=TOL)
    decompress(model)
    assert not any(isinstance(m, FactorizedConv2d) for m in model.modules())
    assert all(type(m) is nn.Conv2d for m in model if not isinstance(m, nn.ReLU))
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_fact, atol=TOL, rtol=TOL)


def test_compress_records_the_whole_model_output_error() -> None:
    model = _net()
    x = _x()
    with torch.no_grad():
        y = model(x)
    out, p = compress(model, CompressConfig(ratio=0.3), input_shape=(4, 8, 8), progress=False)
    assert out is model and p.model_output_error is not None and 0 < p.model_output_error < 1
    with torch.no_grad():
        err = float((model(x) - y).norm() / y.norm())
    assert 0 < err < 1  # compressed, and not garbage


def test_apply_checks_every_layer_before_changing_anything() -> None:
    model = _net()
    p = plan(model, ratio=0.4, input_shape=(4, 8, 8), progress=False)
    other = nn.Sequential(nn.Conv2d(4, 12, 3, padding=1))
    with pytest.raises(TensorcutError) as e:
        apply(other, p)
    assert str(e.value) == (
        "plan names layer '2', which this model does not have; make the plan for this model"
    )
    assert type(other[0]) is nn.Conv2d  # untouched
    apply(model, p)
    with pytest.raises(TensorcutError, match=r"^plan layer '0' is a \w+ in this model, not a "):
        apply(model, p)


def test_apply_refuses_another_geometry_and_an_edited_plan() -> None:
    p = plan(_net(), ratio=0.4, input_shape=(4, 8, 8), progress=False)
    wrong = _net()
    wrong[2] = nn.Conv2d(12, 12, 3, padding=1)  # stride 1, not 2
    with pytest.raises(TensorcutError, match=r"^plan does not match model at '2': planned geom"):
        apply(wrong, p)
    e = next(e for e in p.layers if e.status == "factorize")
    e.params_after += 1
    with pytest.raises(TensorcutError, match=rf"^plan layer '{e.name}' records "):
        apply(_net(), p)


def test_shared_module_is_swapped_once_under_both_names() -> None:
    torch.manual_seed(2)
    shared = nn.Conv2d(6, 6, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(4, 6, 1), shared, nn.ReLU(), shared)
    p = plan(model, rank="full", method="tucker2", input_shape=(4, 6, 6), progress=False)
    apply(model, p)
    assert model[1] is model[3] and isinstance(model[1], FactorizedConv2d)
    decompress(model)
    assert model[1] is model[3] and type(model[1]) is nn.Conv2d


def test_frozen_conv_stays_frozen_through_apply_and_decompress() -> None:
    model = _net()
    model[2].requires_grad_(False)
    apply(model, plan(model, rank="full", input_shape=(4, 8, 8), progress=False))
    assert not any(p.requires_grad for p in model[2].parameters())
    assert all(p.requires_grad for p in model[0].parameters())
    decompress(model)
    assert not any(p.requires_grad for p in model[2].parameters())
