"""TR-SVD and the RSDTR search: error bound, its per-step split, search optimality, ring algebra."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorcut.decompose.tr import (
    MODES,
    error_budgets,
    rsdtr,
    tr_macs,
    tr_max_ranks,
    tr_params,
    tr_svd,
    tr_to_tensor,
)
from tensorcut.errors import TensorcutError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _ring_kernel(shape: tuple[int, ...], ranks: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A kernel that is exactly a tensor ring of the given ranks."""
    cores = [_rand(ranks[k], shape[k], ranks[(k + 1) % 4], seed=seed + k) for k in range(4)]
    return tr_to_tensor(cores)


def _true_error(res, kernel: torch.Tensor) -> float:
    k = kernel.to(torch.float64)
    return float(
        torch.linalg.vector_norm(tr_to_tensor([c.to(torch.float64) for c in res.cores]) - k)
        / k.norm()
    )


KERNELS = {
    "random": _rand(12, 8, 3, 3, seed=1),
    "lowrank": _ring_kernel((10, 6, 3, 3), (2, 3, 2, 2), seed=2)
    + 1e-3 * _rand(10, 6, 3, 3, seed=3),
    "pointwise": _rand(16, 12, 1, 1, seed=4),
    "rect": _rand(7, 5, 3, 2, seed=5),
    "wide": _rand(4, 20, 5, 1, seed=6),
}


# ----------------------------------------------------------------------------- error bound


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("eps", [0.05, 0.3, 0.7])
@pytest.mark.parametrize("split", ["uniform", "zhao"])
def test_tr_svd_error_within_eps_every_shift_and_divisor(name: str, eps: float, split: str) -> None:
    k = KERNELS[name]
    for shift in range(4):
        base = tr_svd(k, eps, shift=shift, split=split)
        big_r = base.ranks[shift] * base.ranks[(shift + 1) % 4]
        for dv in [d for d in range(1, big_r + 1) if big_r % d == 0]:
            res = tr_svd(k, eps, shift=shift, divisor=dv, split=split)
            true = _true_error(res, k)
            assert true <= eps + 1e-12
            # the reported error is the exact reconstruction error (orthonormal steps)
            assert res.rel_error == pytest.approx(true, abs=1e-10)


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("split", ["uniform", "zhao"])
def test_each_step_discards_within_its_share_and_errors_add_in_quadrature(
    name: str, split: str
) -> None:
    k = KERNELS[name]
    eps = 0.4
    budgets = error_budgets(eps, split)
    assert sum(b * b for b in budgets) == pytest.approx(eps * eps, rel=1e-12)
    for shift in range(4):
        res = tr_svd(k, eps, shift=shift, split=split)
        assert res.step_budgets == budgets
        for got, allowed in zip(res.step_errors, budgets, strict=True):
            assert got <= allowed + 1e-12
        # ||T - T~||^2 = D1 + D2 + D3: the identity that makes any split with sum(delta^2) = eps^2
        # safe
        assert _true_error(res, k) ** 2 == pytest.approx(
            sum(x * x for x in res.step_errors), abs=1e-12
        )


def test_error_budget_splits() -> None:
    e = 0.3
    assert error_budgets(e, "uniform") == pytest.approx((e / math.sqrt(3),) * 3)
    assert error_budgets(e, "zhao") == pytest.approx((e * math.sqrt(2) / 2, e / 2, e / 2))


def test_giving_every_step_the_whole_eps_can_break_the_bound() -> None:
    """Why the budget must be split: three steps each discarding up to eps overshoot eps."""
    k = _rand(20, 20, 3, 3, seed=11)
    eps = 0.5
    worst = 0.0
    for shift in range(2):
        # a split that grants each step eps/1 (scaled to look like the uniform one with eps*sqrt(3))
        res = tr_svd(k, min(eps * math.sqrt(3), 0.99), shift=shift)
        worst = max(worst, res.rel_error)
    assert worst > eps


@settings(max_examples=15, deadline=None)
@given(
    o=st.integers(1, 9),
    i=st.integers(1, 7),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    eps=st.floats(0.01, 0.95),
    shift=st.integers(0, 3),
    seed=st.integers(0, 10_000),
)
def test_error_bound_property(
    o: int, i: int, kh: int, kw: int, eps: float, shift: int, seed: int
) -> None:
    k = _rand(o, i, kh, kw, seed=seed)
    res = tr_svd(k, eps, shift=shift, solver="gram")
    assert _true_error(res, k) <= eps + 1e-9
    a, b, c, d = res.ranks
    assert [tuple(g.shape) for g in res.cores] == [(a, o, b), (b, i, c), (c, kh, d), (d, kw, a)]


def test_zero_kernel() -> None:
    res = rsdtr(torch.zeros(4, 3, 3, 3), 0.3)
    assert res.rel_error == 0.0
    assert res.ranks == (1, 1, 1, 1)
    assert torch.count_nonzero(res.to_tensor()) == 0


def test_float32_kernel_keeps_dtype() -> None:
    k = _rand(8, 4, 3, 3, seed=7).float()
    res = rsdtr(k, 0.2)
    assert all(c.dtype == torch.float32 for c in res.cores)
    assert _true_error(res, k) <= 0.2 + 1e-5


# ----------------------------------------------------------------------------- explicit ranks


@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (8, 3, 1, 1), (4, 9, 3, 2), (2, 2, 5, 5)])
def test_max_ranks_are_exact(shape: tuple[int, ...]) -> None:
    k = _rand(*shape, seed=8)
    for solver in ("svd", "gram"):
        res = tr_svd(k, ranks=tr_max_ranks(shape), solver=solver)
        assert res.notes == ()
        assert _true_error(res, k) < 1e-10


@pytest.mark.parametrize("shift", range(4))
def test_planted_tensor_train_recovered_with_its_ranks(shift: int) -> None:
    ranks = [2, 3, 3, 2]
    ranks[shift] = 1  # opened where the ring is already open: TR-SVD is exact at these ranks
    k = _ring_kernel((10, 8, 3, 3), tuple(ranks), seed=9)
    res = tr_svd(k, ranks=ranks, shift=shift)
    assert res.ranks == tuple(ranks)
    assert _true_error(res, k) < 1e-10


def test_tr_svd_split_is_heuristic_for_closed_rings() -> None:
    """A ring with closing rank 2 is generally *not* recovered at its own ranks: the first
    step's basis is split into (r0, r1) by grouping columns, which need not match the ring's
    structure (Zhao et al.'s TR-SVD shares this). Its eps rule still holds, at higher ranks."""
    k = _ring_kernel((10, 8, 3, 3), (2, 2, 3, 3), seed=9)
    assert _true_error(tr_svd(k, ranks=(2, 2, 3, 3)), k) > 1e-3
    res = tr_svd(k, 1e-6, divisor=2)
    assert _true_error(res, k) <= 1e-6


def test_clamped_ranks_are_reported() -> None:
    k = _rand(6, 5, 3, 3, seed=10)
    res = tr_svd(k, ranks=(4, 4, 100, 100), shift=2)
    assert res.notes and any("clamped" in n for n in res.notes)
    a, b, c, d = res.ranks
    assert c * d <= 3 and d <= 6 * 5 * 3


def test_divisor_raising_first_rank_is_noted() -> None:
    k = _rand(24, 10, 3, 3, seed=1)
    base = tr_svd(k, 0.3)
    big_r = base.ranks[0] * base.ranks[1]
    assert big_r < 23
    dv = next(d for d in range(2, 24) if big_r % d and -(-big_r // d) * d <= 24)
    res = tr_svd(k, 0.3, divisor=dv)
    assert res.divisor == dv and (res.ranks[0] * res.ranks[1]) % dv == 0
    assert any("raised" in n for n in res.notes)
    assert res.rel_error <= 0.3


# ----------------------------------------------------------------------------- search


def _brute_force(
    k: torch.Tensor, eps: float, solver: str
) -> list[tuple[int, int, tuple[int, ...], float]]:
    rows = []
    for shift in range(4):
        base = tr_svd(k, eps, shift=shift, solver=solver)
        big_r = base.ranks[shift] * base.ranks[(shift + 1) % 4]
        for dv in [d for d in range(1, big_r + 1) if big_r % d == 0]:
            res = tr_svd(k, eps, shift=shift, divisor=dv, solver=solver)
            rows.append((shift, dv, res.ranks, res.rel_error))
    return rows


@pytest.mark.parametrize("name", ["random", "lowrank", "rect", "wide"])
@pytest.mark.parametrize("eps", [0.2, 0.5])
def test_rsdtr_picks_brute_force_minimum(name: str, eps: float) -> None:
    k = KERNELS[name]
    shape = tuple(k.shape)
    res = rsdtr(k, eps)
    brute = _brute_force(k, eps, "gram")
    table = {(c.shift, c.divisor): c for c in res.search}
    assert set(table) == {(s, d) for s, d, _, _ in brute}
    for s, d, ranks, err in brute:
        assert table[(s, d)].ranks == ranks
        assert table[(s, d)].rel_error == pytest.approx(err, abs=1e-9)
    best = min(brute, key=lambda row: (tr_params(shape, row[2]), round(row[3], 9), row[0], row[1]))
    assert (res.shift, res.divisor, res.ranks) == (best[0], best[1], best[2])
    assert res.params == tr_params(shape, res.ranks) == min(tr_params(shape, r[2]) for r in brute)
    assert res.rel_error <= eps


def test_rsdtr_macs_objective_picks_fewest_macs() -> None:
    k = KERNELS["random"]
    shape = tuple(k.shape)
    hw, stride, pad = (10, 12), (2, 1), 1
    res = rsdtr(k, 0.5, objective="macs", input_size=hw, stride=stride, padding=pad)
    macs = [tr_macs(shape, c.ranks, hw, stride=stride, padding=pad) for c in res.search]
    assert all(c.macs == m for c, m in zip(res.search, macs, strict=True))
    assert tr_macs(shape, res.ranks, hw, stride=stride, padding=pad) == min(macs)


def test_svd_and_gram_solvers_agree_on_the_whole_search() -> None:
    """Canonical signs make the divisor split independent of the factorisation routine."""
    k = KERNELS["random"]
    a = rsdtr(k, 0.4, solver="svd")
    b = rsdtr(k, 0.4, solver="gram")
    assert [(c.shift, c.divisor, c.ranks) for c in a.search] == [
        (c.shift, c.divisor, c.ranks) for c in b.search
    ]
    assert (a.shift, a.divisor, a.ranks) == (b.shift, b.divisor, b.ranks)


def test_rsdtr_finds_planted_tensor_train_at_any_shift() -> None:
    shape, ranks = (16, 12, 3, 3), (3, 1, 3, 2)  # open between OUT and IN
    k = _ring_kernel(shape, ranks, seed=12)
    res = rsdtr(k, 1e-3)
    assert res.params <= tr_params(shape, ranks)
    assert _true_error(res, k) <= 1e-3


def test_rsdtr_cores_in_fixed_order_whatever_shift() -> None:
    k = KERNELS["rect"]
    for s in range(4):
        res = rsdtr(k, 0.3, shifts=[s])
        assert res.shift == s
        a, b, c, d = res.ranks
        assert [tuple(g.shape) for g in res.cores] == [(a, 7, b), (b, 5, c), (c, 3, d), (d, 2, a)]
        assert _true_error(res, k) <= 0.3 + 1e-12


def test_callable_objective() -> None:
    k = KERNELS["random"]
    res = rsdtr(k, 0.5, objective=lambda r: r[0])  # smallest closing rank: a tensor train somewhere
    assert res.ranks[res.shift] == min(c.ranks[c.shift] for c in res.search) == 1


# -------------------------------------------------------------------------- ring algebra and counts


@pytest.mark.parametrize("ranks", [(1, 2, 3, 4), (4, 3, 2, 1), (3, 1, 5, 2)])
def test_tr_to_tensor_matches_einsum(ranks: tuple[int, ...]) -> None:
    shape = (3, 4, 2, 5)
    cores = [_rand(ranks[k], shape[k], ranks[(k + 1) % 4], seed=k) for k in range(4)]
    ref = torch.einsum("aob,bic,chd,dwa->oihw", *cores)
    assert torch.allclose(tr_to_tensor(cores), ref)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_tr_to_tensor_other_lengths(n: int) -> None:
    letters = "abcdef"
    cores = [_rand(2 + k % 2, 2 + k, 2 + (k + 1) % 2 if k < n - 1 else 2, seed=k) for k in range(n)]
    if n == 1:
        cores = [_rand(3, 4, 3)]
        ref = torch.einsum("aia->i", cores[0])
    else:
        spec = ",".join(f"{letters[k]}{'ijklm'[k]}{letters[(k + 1) % n]}" for k in range(n))
        ref = torch.einsum(spec + "->" + "ijklm"[:n], *cores)
    assert torch.allclose(tr_to_tensor(cores), ref)


def test_tr_to_tensor_rejects_broken_ring() -> None:
    with pytest.raises(TensorcutError, match="rank mismatch"):
        tr_to_tensor([_rand(2, 3, 2), _rand(2, 3, 3), _rand(2, 3, 2), _rand(2, 3, 2)])


def test_params_formula() -> None:
    assert tr_params((5, 4, 3, 2), (1, 2, 3, 4)) == 1 * 5 * 2 + 2 * 4 * 3 + 3 * 3 * 4 + 4 * 2 * 1
    assert tr_max_ranks((5, 4, 3, 2)) == (1, 5, 6, 2)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("eps", [0, -0.1, 1, 1.5, float("nan"), True, "0.3"])
def test_bad_eps(eps: object) -> None:
    k = _rand(4, 3, 3, 3)
    with pytest.raises(TensorcutError, match="eps"):
        tr_svd(k, eps)  # type: ignore[arg-type]
    with pytest.raises(TensorcutError, match="eps"):
        rsdtr(k, eps)  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    k = _rand(4, 3, 3, 3)
    with pytest.raises(TensorcutError, match="4-way"):
        tr_svd(_rand(4, 3, 3), 0.3)
    with pytest.raises(TensorcutError, match="floating"):
        tr_svd(torch.ones(2, 2, 2, 2, dtype=torch.int64), 0.3)
    bad = k.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(TensorcutError, match="NaN"):
        rsdtr(bad, 0.3)
    with pytest.raises(TensorcutError, match="exactly one"):
        tr_svd(k)
    with pytest.raises(TensorcutError, match="exactly one"):
        tr_svd(k, 0.3, ranks=(1, 1, 1, 1))
    with pytest.raises(TensorcutError, match="shift"):
        tr_svd(k, 0.3, shift=4)
    assert tr_svd(k, 0.3, shift="KH").shift == MODES.index("KH")
    with pytest.raises(TensorcutError, match="split"):
        tr_svd(k, 0.3, split="even")
    with pytest.raises(TensorcutError, match="divisor"):
        tr_svd(k, 0.3, divisor=0)
    with pytest.raises(TensorcutError, match="conflicts"):
        tr_svd(k, ranks=(2, 1, 1, 1), divisor=1)
    with pytest.raises(TensorcutError, match="input_size"):
        rsdtr(k, 0.3, objective="macs")
    with pytest.raises(TensorcutError, match="objective"):
        rsdtr(k, 0.3, objective="flops")
    with pytest.raises(TensorcutError, match="ranks"):
        tr_svd(k, ranks=(1, 0, 1, 1))
