"""tensorcut.decompose.tt: TT-SVD shapes, exactness and the eps bound."""

from __future__ import annotations

import pytest
import torch

from tensorcut.decompose import RankClampWarning, tt_max_ranks, tt_svd, tt_to_tensor
from tensorcut.errors import TensorcutError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _tensor(
    shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _tt_low_rank(shape: tuple[int, ...], r: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = [1] + [r] * (len(shape) - 1) + [1]
    cores = [
        torch.randn(ranks[k], n, ranks[k + 1], dtype=torch.float64, generator=g)
        for k, n in enumerate(shape)
    ]
    T = tt_to_tensor(cores)
    return T + noise * T.norm() / T.numel() ** 0.5 * torch.randn(
        *shape, dtype=torch.float64, generator=g
    )


def _rel(T: torch.Tensor, A: torch.Tensor) -> float:
    return float(torch.linalg.norm(T - A) / torch.linalg.norm(T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_rank_exact_and_shapes(dtype: torch.dtype) -> None:
    T = _tensor((4, 3, 5, 6), dtype=dtype)
    cores = tt_svd(T)
    assert [tuple(G.shape) for G in cores] == [(1, 4, 4), (4, 3, 12), (12, 5, 6), (6, 6, 1)]
    assert all(G.dtype == dtype for G in cores)
    assert _rel(T, tt_to_tensor(cores)) < (1e-5 if dtype == torch.float32 else 1e-12)
    assert tt_max_ranks(T.shape) == (4, 12, 6)


@pytest.mark.parametrize("eps", [1e-3, 0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_eps_bound(eps: float, seed: int) -> None:
    T = _tt_low_rank((5, 4, 6, 3, 4), 3, noise=0.1, seed=seed)
    cores = tt_svd(T, eps=eps)
    assert cores[0].shape[0] == 1 and cores[-1].shape[2] == 1
    assert _rel(T, tt_to_tensor(cores)) <= eps + 1e-12
    full = tt_svd(T, energy=1 - eps**2)
    assert [G.shape for G in full] == [G.shape for G in cores]


def test_eps_truncates_low_rank_tensor() -> None:
    T = _tt_low_rank((6, 5, 4, 6), 2, noise=0.0)
    cores = tt_svd(T, eps=1e-8)
    assert [G.shape[2] for G in cores[:-1]] == [2, 2, 2]


def test_fixed_ranks_error_non_increasing() -> None:
    T = _tensor((5, 4, 4, 5), seed=2)
    errs = [_rel(T, tt_to_tensor(tt_svd(T, [r, r, r]))) for r in (1, 2, 3, 4, 5)]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:], strict=False))


def test_ranks_cap_eps() -> None:
    T = _tensor((5, 4, 4, 5), seed=3)
    cores = tt_svd(T, [2, 3, 2], eps=1e-9)
    assert [G.shape[2] for G in cores[:-1]] == [2, 3, 2]


def test_clamp_warns() -> None:
    T = _tensor((3, 4, 5))
    with pytest.warns(RankClampWarning, match=r"r_1 7 clamped to 3"):
        cores = tt_svd(T, [7, 2])
    assert cores[0].shape == (1, 3, 3)


@pytest.mark.parametrize("bad", [[0, 2], [2, -1]])
def test_invalid_rank_raises(bad: list[int]) -> None:
    with pytest.raises(TensorcutError, match=r"must be in \[1, "):
        tt_svd(_tensor((3, 4, 5)), bad)


def test_bad_inputs() -> None:
    with pytest.raises(TensorcutError):
        tt_svd(_tensor((3, 4, 5)), [1, 2, 3])
    with pytest.raises(TensorcutError):
        tt_svd(torch.randn(4))
    with pytest.raises(TensorcutError):
        tt_to_tensor([torch.randn(2, 3, 1)])
