"""tensorcut.decompose.svd: truncated / randomized SVD and the rank-from-error rules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorcut.decompose import RankClampWarning, clamp_rank, rank_from_spectrum, truncated_svd
from tensorcut.errors import TensorcutError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _low_rank(
    m: int, n: int, r: int, dtype: torch.dtype = torch.float64, seed: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype)


def _rel_err(M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> float:
    return float(torch.linalg.norm(M - (U * S) @ Vh) / torch.linalg.norm(M))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_svd_reconstructs(dtype: torch.dtype) -> None:
    M = torch.randn(12, 7, dtype=dtype, generator=torch.Generator().manual_seed(1))
    U, S, Vh = truncated_svd(M)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    assert U.shape == (12, 7) and S.shape == (7,) and Vh.shape == (7, 7)
    assert _rel_err(M, U, S, Vh) < (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.2, 0.5, 0.9, 1.5])
def test_eps_rule_is_exact_and_minimal(eps: float) -> None:
    M = torch.randn(30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    S_all = torch.linalg.svdvals(M)
    U, S, Vh = truncated_svd(M, eps=eps)
    k = S.numel()
    assert k >= 1
    err = _rel_err(M, U, S, Vh)
    assert err <= eps + 1e-12
    if k > 1:  # one fewer would break the bound
        tail = math.sqrt(float((S_all[k - 1 :] ** 2).sum() / (S_all**2).sum()))
        assert tail > eps


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_rule_is_exact_and_minimal(energy: float) -> None:
    M = torch.randn(25, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    S_all = torch.linalg.svdvals(M)
    total = float((S_all**2).sum())
    k = truncated_svd(M, energy=energy)[1].numel()
    assert float((S_all[:k] ** 2).sum()) / total >= energy - 1e-12
    if k > 1:
        assert float((S_all[: k - 1] ** 2).sum()) / total < energy


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=1, max_size=30),
    st.floats(0.0, 1.0),
)
def test_rank_from_spectrum_property(values: list[float], eps: float) -> None:
    S = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    k = rank_from_spectrum(S, eps=eps)
    assert 1 <= k <= S.numel()
    total = float((S**2).sum())
    if total > 0:
        assert float((S[k:] ** 2).sum()) <= eps**2 * total * (1 + 1e-12) + 1e-300
        if k > 1:
            assert float((S[k - 1 :] ** 2).sum()) > eps**2 * total


def test_rank_from_spectrum_never_zero() -> None:
    assert rank_from_spectrum(torch.zeros(5), eps=0.1) == 1
    assert rank_from_spectrum(torch.tensor([3.0, 0.0]), eps=0.0) == 1
    assert rank_from_spectrum(torch.tensor([1.0, 1e-3]), energy=0.5) == 1


def test_randomized_matches_exact_on_low_rank() -> None:
    M = _low_rank(200, 150, 6)
    U, S, Vh = truncated_svd(M, 6, randomized=True)
    assert _rel_err(M, U, S, Vh) < 1e-10
    assert torch.allclose(S, torch.linalg.svdvals(M)[:6], rtol=1e-10)


def test_randomized_with_eps_meets_bound() -> None:
    g = torch.Generator().manual_seed(4)
    M = _low_rank(300, 200, 10) + 1e-4 * torch.randn(300, 200, generator=g, dtype=torch.float64)
    U, S, Vh = truncated_svd(M, eps=1e-2, randomized=True)
    assert S.numel() == 10
    assert _rel_err(M, U, S, Vh) <= 1e-2


def test_randomized_is_seeded() -> None:
    M = torch.randn(80, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a = truncated_svd(M, 5, randomized=True, seed=3)
    b = truncated_svd(M, 5, randomized=True, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_signs_are_deterministic() -> None:
    M = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    U, _, _ = truncated_svd(M, 4)
    idx = U.abs().argmax(dim=0)
    assert bool((U[idx, torch.arange(4)] > 0).all())


def test_clamp_warns_with_both_values() -> None:
    M = torch.randn(5, 4, dtype=torch.float64)
    with pytest.warns(RankClampWarning, match=r"rank 9 clamped to 4"):
        U, S, Vh = truncated_svd(M, 9)
    assert S.numel() == 4


@pytest.mark.parametrize("bad", [0, -2])
def test_invalid_rank_raises_with_range(bad: int) -> None:
    with pytest.raises(TensorcutError, match=r"\[1, 4\]"):
        truncated_svd(torch.randn(5, 4), bad)
    with pytest.raises(TensorcutError, match=r"\[1, 7\]"):
        clamp_rank(bad, 7)


def test_bad_arguments_raise() -> None:
    M = torch.randn(4, 3)
    with pytest.raises(TensorcutError):
        truncated_svd(M, 2, eps=0.1)
    with pytest.raises(TensorcutError):
        truncated_svd(M, eps=-0.1)
    with pytest.raises(TensorcutError):
        truncated_svd(M, energy=1.5)
    with pytest.raises(TensorcutError):
        truncated_svd(torch.randn(2, 3, 4))
    with pytest.raises(TensorcutError):
        truncated_svd(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(TensorcutError):
        rank_from_spectrum(torch.ones(3))


def test_half_precision_is_computed_in_float32() -> None:
    M = torch.randn(6, 5).to(torch.bfloat16)
    U, S, Vh = truncated_svd(M, 3)
    assert U.dtype == torch.bfloat16 and S.shape == (3,)
