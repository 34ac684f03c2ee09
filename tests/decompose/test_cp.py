"""tensorcut.decompose.cp: CP-ALS accuracy, determinism, guards and failure modes."""

from __future__ import annotations

import pytest
import torch

from tensorcut.decompose import (
    CPResult,
    RankClampWarning,
    cp_als,
    cp_max_rank,
    cp_to_tensor,
    khatri_rao,
)
from tensorcut.errors import ConvergenceError, TensorcutError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _low_rank(
    shape: tuple[int, ...], r: int, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return cp_to_tensor(None, [torch.randn(n, r, dtype=dtype, generator=g) for n in shape])


def _rel(T: torch.Tensor, A: torch.Tensor) -> float:
    return float(torch.linalg.norm(T - A) / torch.linalg.norm(T))


def test_khatri_rao_matches_definition() -> None:
    A, B, C = torch.randn(3, 2), torch.randn(4, 2), torch.randn(2, 2)
    K = khatri_rao([A, B, C])
    ref = torch.stack([torch.kron(torch.kron(A[:, r], B[:, r]), C[:, r]) for r in range(2)], dim=1)
    assert torch.allclose(K, ref)


def test_cp_to_tensor_matches_sum_of_outer_products() -> None:
    fs = [torch.randn(n, 3, dtype=torch.float64) for n in (4, 3, 2, 5)]
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    ref = sum(w[r] * torch.einsum("a,b,c,d->abcd", *(F[:, r] for F in fs)) for r in range(3))
    assert torch.allclose(cp_to_tensor(w, fs), ref)


@pytest.mark.parametrize("shape", [(8, 7, 6, 5), (10, 9, 3, 3), (6, 5, 4)])
@pytest.mark.parametrize("init", ["svd", "random"])
def test_recovers_exact_low_rank(shape: tuple[int, ...], init: str) -> None:
    T = _low_rank(shape, 3, seed=len(shape))
    res = cp_als(T, 3, init=init, tol=1e-10, n_iter_max=500, n_restarts=2)
    assert isinstance(res, CPResult)
    assert res.rel_error < 1e-6
    assert _rel(T, res.to_tensor()) < 1e-6
    assert res.rank == 3 and res.converged
    # unit-norm columns, weights sorted descending
    for F in res.factors:
        assert torch.allclose(torch.linalg.norm(F, dim=0), torch.ones(3, dtype=F.dtype))
    assert bool((res.weights[:-1] >= res.weights[1:]).all())


def test_float32_runs_and_fits() -> None:
    T = _low_rank((8, 7, 3, 3), 2, dtype=torch.float32)
    res = cp_als(T, 2)
    assert res.weights.dtype == torch.float32 and res.rel_error < 1e-3


def test_deterministic_with_seed() -> None:
    T = torch.randn(6, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = cp_als(T, 4, init="random", seed=7, n_iter_max=30)
    b = cp_als(T, 4, init="random", seed=7, n_iter_max=30)
    assert torch.equal(a.weights, b.weights) and all(
        torch.equal(x, y) for x, y in zip(a.factors, b.factors, strict=True)
    )


def test_restarts_keep_best() -> None:
    T = torch.randn(6, 5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    single = [cp_als(T, 5, init="random", seed=s, n_iter_max=40).rel_error for s in range(3)]
    best = cp_als(T, 5, init="random", seed=0, n_restarts=3, n_iter_max=40)
    assert best.rel_error <= min(single) + 1e-12


def test_max_rank_is_exact_and_clamped() -> None:
    T = torch.randn(5, 4, 3, 2, dtype=torch.float64)
    bound = cp_max_rank(T.shape)
    assert bound == 4 * 3 * 2
    with pytest.warns(RankClampWarning, match=rf"CP rank 100 clamped to {bound}"):
        res = cp_als(T, 100)
    assert res.rank == bound and res.rel_error == 0.0
    assert _rel(T, res.to_tensor()) < 1e-12


def test_nan_input_raises_convergence_error() -> None:
    T = torch.randn(4, 3, 3, 3)
    T[1, 2, 0, 0] = float("nan")
    with pytest.raises(ConvergenceError, match="NaN"):
        cp_als(T, 2)


def test_diverging_norms_raise_convergence_error() -> None:
    T = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(ConvergenceError, match="diverging"):
        cp_als(T, 3, max_norm_ratio=1e-3, n_restarts=2)


def test_not_converged_is_reported() -> None:
    T = torch.randn(6, 5, 4, 3, dtype=torch.float64)
    res = cp_als(T, 6, n_iter_max=2, tol=0.0)
    assert not res.converged and res.n_iter == 2 and "n_iter_max=2" in res.message


@pytest.mark.parametrize("bad", [0, -3])
def test_invalid_rank_raises(bad: int) -> None:
    with pytest.raises(TensorcutError, match=r"\[1, 12\]"):
        cp_als(torch.randn(4, 3, 2, 2), bad)


def test_bad_arguments() -> None:
    T = torch.randn(4, 3, 2)
    with pytest.raises(TensorcutError):
        cp_als(T, 2, init="nope")
    with pytest.raises(TensorcutError):
        cp_als(torch.randn(5), 1)
    with pytest.raises(TensorcutError):
        cp_to_tensor(None, [torch.randn(3, 2), torch.randn(3, 3)])


def test_zero_tensor() -> None:
    res = cp_als(torch.zeros(3, 4, 2, dtype=torch.float64), 2)
    assert res.rel_error == 0.0 and bool((res.weights == 0).all())
