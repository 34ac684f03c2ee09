"""tensorcut.decompose.tucker: HOSVD, HOOI, Tucker-2, eps budget."""

from __future__ import annotations

import pytest
import torch

from tensorcut.decompose import RankClampWarning, hooi, hosvd, mode_dot, tucker2, tucker_to_tensor
from tensorcut.errors import TensorcutError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _tensor(
    shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _decaying(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor whose multilinear spectra decay, so eps picks intermediate ranks."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(*shape, dtype=torch.float64, generator=g)
    for n, s in enumerate(shape):
        shape_n = [-1 if m == n else 1 for m in range(len(shape))]
        scale = torch.exp(-0.6 * torch.arange(s, dtype=torch.float64)).reshape(shape_n)
        core = core * scale
    for n, s in enumerate(shape):
        Q = torch.linalg.qr(torch.randn(s, s, dtype=torch.float64, generator=g)).Q
        core = mode_dot(core, Q, n)
    return core


def _rel(T: torch.Tensor, A: torch.Tensor) -> float:
    return float(torch.linalg.norm(T - A) / torch.linalg.norm(T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_rank_is_exact(dtype: torch.dtype) -> None:
    T = _tensor((5, 4, 3, 2), dtype=dtype)
    for res in (hosvd(T), hooi(T)):
        assert res.core.dtype == dtype
        assert _rel(T, res.to_tensor()) < (1e-5 if dtype == torch.float32 else 1e-12)
        for U in res.factors:
            assert U is not None
            eye = torch.eye(U.shape[1], dtype=dtype)
            assert torch.allclose(U.mT @ U, eye, atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3, 0.6])
def test_eps_bound_holds(eps: float) -> None:
    T = _decaying((8, 7, 5, 4), seed=1)
    for res in (hosvd(T, eps=eps), hooi(T, eps=eps)):
        assert res.rel_error <= eps + 1e-12
        assert _rel(T, res.to_tensor()) <= eps + 1e-12
    assert hosvd(T, eps=0.3).ranks != T.shape  # the rule actually truncates
    # energy means eps = sqrt(1 - energy)
    assert hosvd(T, energy=1 - eps**2).ranks == hosvd(T, eps=eps).ranks


def test_hooi_never_worse_than_hosvd() -> None:
    for seed in range(4):
        T = _tensor((6, 6, 4, 3), seed=seed)
        ranks = [3, 2, 2, 2]
        a, b = hosvd(T, ranks), hooi(T, ranks, n_iter=10)
        assert b.rel_error <= a.rel_error + 1e-12
        assert b.ranks == a.ranks == (3, 2, 2, 2)


def test_tucker2_structure_and_none_factors() -> None:
    K = _tensor((6, 5, 3, 3))
    res = tucker2(K, (3, 2))
    assert res.factors[2] is None and res.factors[3] is None
    assert res.core.shape == (3, 2, 3, 3) and res.ranks == (3, 2, 3, 3)
    assert abs(_rel(K, tucker_to_tensor(res.core, res.factors)) - res.rel_error) < 1e-12
    full = tucker2(K)
    assert full.ranks == (6, 5, 3, 3) and full.rel_error < 1e-12
    hos = tucker2(K, (3, 2), hooi=False)
    assert res.rel_error <= hos.rel_error + 1e-12
    assert tucker2(K, 2).ranks[:2] == (2, 2)


def test_tucker2_eps_bound() -> None:
    K = _decaying((9, 8, 3, 3), seed=2)
    for eps in (0.05, 0.2, 0.5):
        res = tucker2(K, eps=eps)
        assert res.rel_error <= eps + 1e-12
        assert res.factors[2] is None


def test_error_non_increasing_in_rank() -> None:
    K = _tensor((8, 6, 3, 3), seed=3)
    errs = [tucker2(K, (r, r)).rel_error for r in range(1, 7)]
    assert all(b <= a + 1e-10 for a, b in zip(errs, errs[1:], strict=False))


def test_clamp_warns_and_reports() -> None:
    K = _tensor((8, 2, 1, 1))  # mode 0 admits at most 2
    with pytest.warns(RankClampWarning, match=r"rank of mode 0 5 clamped to 2"):
        res = hosvd(K, [5, None, None, None])
    assert res.ranks[0] == 2


@pytest.mark.parametrize("bad", [0, -1])
def test_invalid_rank_raises(bad: int) -> None:
    with pytest.raises(TensorcutError, match=r"\[1, 6\]"):
        tucker2(_tensor((6, 5, 3, 3)), (bad, 2))


def test_bad_inputs() -> None:
    with pytest.raises(TensorcutError):
        tucker2(torch.randn(3, 3))
    with pytest.raises(TensorcutError):
        hosvd(torch.randn(3, 3, 3), [1, 2])
    with pytest.raises(TensorcutError):
        hosvd(torch.randn(3, 3, 3), [1, 1, 1], eps=0.1)
    with pytest.raises(TensorcutError):
        hosvd(torch.full((2, 2, 2), float("nan")))
    with pytest.raises(TensorcutError):
        tucker_to_tensor(torch.randn(2, 2), [None])


def test_zero_tensor() -> None:
    res = hooi(torch.zeros(3, 4, 2, dtype=torch.float64), [1, 1, 1])
    assert res.rel_error == 0.0
