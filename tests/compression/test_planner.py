"""The planner (``compression/planner.py``): ``plan`` is pure, picks layers, refuses in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tensorcut.compression import CompressConfig, apply, plan
from tensorcut.errors import TensorcutError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # a stem: skipped by the default filter
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
    )


def test_plan_is_pure() -> None:
    model = _net()
    model.train()
    before = copy.deepcopy(model.state_dict())
    modules = list(model.modules())
    p = plan(model, ratio=0.4, input_shape=(3, 8, 8), progress=False)
    assert list(model.modules()) == modules and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [e.name for e in p.layers] == ["2", "4"]  # the 3-channel stem is not listed
    assert p.input_shape == [3, 8, 8] and p.config["ratio"] == 0.4


def test_keywords_equal_a_config() -> None:
    a = plan(_net(), ratio=0.4, input_shape=(3, 8, 8), progress=False)
    b = plan(_net(), CompressConfig(ratio=0.4), input_shape=(3, 8, 8), progress=False)
    assert a.to_dict() == b.to_dict()
    with pytest.raises(TensorcutError) as e:
        plan(_net(), CompressConfig(ratio=0.4), ratio=0.5, input_shape=(3, 8, 8))
    assert str(e.value) == "give either a CompressConfig or keyword options, not both"


def test_layers_and_filter_choose_what_is_listed() -> None:
    p = plan(_net(), ratio=0.4, input_shape=(3, 8, 8), layers=["0", "4"], progress=False)
    assert [e.name for e in p.layers] == ["0", "4"]
    p = plan(
        _net(), ratio=0.4, input_shape=(3, 8, 8), filter_fn=lambda n, m: n == "2", progress=False
    )
    assert [e.name for e in p.layers] == ["2"]
    with pytest.raises(TensorcutError) as e:
        plan(_net(), ratio=0.4, input_shape=(3, 8, 8), layers=["9"])
    assert str(e.value) == "unknown layer '9'; conv layers are: 0, 2, 4"
    with pytest.raises(TensorcutError) as e:
        plan(_net(), ratio=0.4, input_shape=(3, 8, 8), filter_fn=lambda n, m: False)
    assert str(e.value) == (
        "the filter selected no conv layer; nothing to compress (the default skips stems with "
        "<= 3 input channels)"
    )


def test_models_without_dense_convs_are_refused() -> None:
    with pytest.raises(TensorcutError) as e:
        plan(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), ratio=0.4, input_shape=(1, 2, 2))
    assert str(e.value) == "the model has no Conv2d layers to compress"
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    apply(model, plan(model, ratio=0.4, input_shape=(8, 6, 6), progress=False))
    with pytest.raises(TensorcutError) as e:
        plan(model, ratio=0.4, input_shape=(8, 6, 6))
    assert str(e.value) == (
        "the model is already compressed (1 factorized layers, no dense Conv2d left); compress "
        "the dense original, or tensorcut.decompress(model) first"
    )


def test_a_conv_the_forward_never_calls_stays_dense_with_its_reason() -> None:
    model = _net()
    model.add_module("unused", nn.Conv2d(16, 16, 3))

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body[:5](x)

    p = plan(Skip(), ratio=0.4, input_shape=(3, 8, 8), progress=False)
    e = {e.name: e for e in p.layers}["body.unused"]
    assert e.status == "dense"
    assert e.reason == "not called by forward on the calibration input; left dense"


def test_every_factorized_entry_was_checked_on_its_captured_input() -> None:
    p = plan(_net(), ratio=0.4, input_shape=(3, 8, 8), progress=False)
    fact = [e for e in p.layers if e.status == "factorize"]
    assert fact and all(e.output_error is not None and e.output_error < 1 for e in fact)
    assert all(e.macs_before > 0 and e.calls == 1 for e in p.layers)


def test_sensitivity_needs_a_budget() -> None:
    """The CLI's "--sensitivity guides the --budget allocation" is the API's rule."""
    with pytest.raises(TensorcutError) as e:
        plan(_net(), CompressConfig(method="tucker2", ratio=0.5), sensitivity={"conv2": 2.0})
    assert str(e.value) == (
        "sensitivity guides a budget's allocation; give a budget too (or drop sensitivity)"
    )
