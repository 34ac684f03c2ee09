"""SVDLinear: exactness, error rules, clamping, counts, round trips."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tensorcut.decompose import RankClampWarning
from tensorcut.errors import TensorcutError
from tensorcut.layers import SVDLinear

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _linear(
    i: int = 12, o: int = 9, bias: bool = True, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_is_exact(bias: bool) -> None:
    lin = _linear(bias=bias)
    layer = SVDLinear.from_linear(lin)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x))
    assert layer.rank == 9 and layer.rel_error < 1e-12
    assert (
        layer.num_params()
        == SVDLinear.predicted_params(12, 9, 9, bias)
        == 9 * 21 + (9 if bias else 0)
    )
    torch.testing.assert_close(layer.to_linear()(x), lin(x))


@pytest.mark.parametrize("eps", [0.1, 0.5, 0.8])
def test_eps_and_energy(eps: float) -> None:
    lin = _linear(30, 20)
    layer = SVDLinear.from_linear(lin, eps=eps)
    err = _rel(layer.reconstruct_weight().detach(), lin.weight.detach())
    assert err <= eps + 1e-12 and abs(err - layer.rel_error) < 1e-12
    assert SVDLinear.from_linear(lin, energy=1 - eps**2).rank == layer.rank
    if layer.rank > 1:
        worse = SVDLinear.from_linear(lin, rank=layer.rank - 1)
        assert worse.rel_error > eps


def test_error_non_increasing_in_rank() -> None:
    lin = _linear(16, 10)
    errs = [SVDLinear.from_linear(lin, rank=r).rel_error for r in range(1, 11)]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:], strict=False))


def test_factors_are_balanced() -> None:
    layer = SVDLinear.from_linear(_linear(), rank=4)
    a = torch.linalg.norm(layer.first.weight, dim=1)
    b = torch.linalg.norm(layer.last.weight, dim=0)
    torch.testing.assert_close(a, b)


def test_clamp_warns_and_rank_zero_raises() -> None:
    lin = _linear(6, 4)
    with pytest.warns(RankClampWarning, match="rank 10 clamped to 4"):
        assert SVDLinear.from_linear(lin, rank=10).rank == 4
    with pytest.raises(TensorcutError, match=r"\[1, 4\]"):
        SVDLinear.from_linear(lin, rank=0)
    with pytest.raises(TensorcutError):
        SVDLinear.from_linear(lin, rank=2, eps=0.1)
    with pytest.raises(TensorcutError):
        SVDLinear.from_linear(nn.Conv2d(2, 2, 1))  # type: ignore[arg-type]
    with pytest.raises(TensorcutError):
        SVDLinear(4, 3, 0)


def test_config_state_dict_round_trip() -> None:
    layer = SVDLinear.from_linear(_linear(), rank=5)
    cfg = json.loads(json.dumps(layer.config()))
    rebuilt = SVDLinear.from_config(cfg).to(torch.float64)
    assert all(bool((p == 0).all()) for p in rebuilt.parameters())
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(4, 12, dtype=torch.float64)
    assert torch.equal(rebuilt(x), layer(x))


def test_float32_and_randomized() -> None:
    lin = _linear(40, 30, dtype=torch.float32)
    layer = SVDLinear.from_linear(lin, rank=6, randomized=True, seed=1)
    assert layer.first.weight.dtype == torch.float32
    exact = SVDLinear.from_linear(lin, rank=6)
    assert abs(layer.rel_error - exact.rel_error) < 1e-3
    assert layer.macs((8,)) == 8 * 6 * 70
