"""Optimiser-state transport across TDLRT's changes of basis
(tensorcut.train.tdlrt_ops.transport_state).

Adam's step on an entry is ``lr * m_hat / (sqrt(v_hat) + eps)``; for Adam itself ``|m| <= c
sqrt(v)`` entrywise with ``c = (1 - b1) / sqrt((1 - b2)(1 - b1^2 / b2))`` (Cauchy-Schwarz over the
two exponential averages), so no step exceeds a few learning rates. Transporting the second moment
as ``(sqrt(v) x_i M_i)^2`` (signed ``M_i``) lets the sums cancel after a rotation and breaks that
bound: measured on the DDP test's network, ratios ``m_hat / sqrt(v_hat)`` of 672 (layer 2) and 1260
(layer 4) within three steps. Transporting it as ``(sqrt(v) x_i |M_i|)^2`` keeps the bound but
inflates ``v`` by up to the number of coordinates a rotation mixes, and the truncation rotates the
core every step: Adam's steps shrank and full-rank TDLRT (tau = 0) ended 7 points under dense
training on digits (benchmarks/results/tdlrt.md). The transport is ``v x_i (M_i * M_i)`` (a mean
square stays a mean square), with ``v`` raised where a transported ``|m|`` would exceed the
tensor's previous largest ``|m| / sqrt(v)``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorcut.train.tdlrt import TDLRTOptimizer, tuckerize
from tensorcut.train.tdlrt_ops import (
    augment_basis,
    galerkin_core,
    orthonormality_error,
    transport_state,
    truncation_rank,
)

pytestmark = pytest.mark.usefixtures("one_thread")

U64 = torch.finfo(torch.float64).eps / 2  # unit roundoff of the float64 sums below


def _adam_bound(b1: float, b2: float) -> float:
    """``c`` with ``|m| <= c sqrt(v)`` for every entry of Adam's moments (any gradient sequence)."""
    return (1 - b1) / math.sqrt((1 - b2) * (1 - b1 * b1 / b2))


def test_rotation_keeps_first_moment_within_second() -> None:
    """m = [a, -a], v = [a^2, a^2], turned by 45 degrees.

    The signed rule gives v' = [2a^2, 0] with m' = [0, sqrt2 a].
    """
    a = 0.3
    c = math.sqrt(0.5)
    M = torch.tensor(
        [[c, c], [-c, c]], dtype=torch.float64
    )  # rotation, as a truncation's P^T may be
    state = {
        "exp_avg": torch.tensor([[a, -a]], dtype=torch.float64).reshape(1, 2),
        "exp_avg_sq": torch.full((1, 2), a * a, dtype=torch.float64),
        "step": torch.tensor(3.0),
    }
    transport_state(state, (1, 2), [(1, M)])
    m, v = state["exp_avg"], state["exp_avg_sq"]
    assert torch.allclose(
        m, galerkin_core(torch.tensor([[a, -a]], dtype=torch.float64), [(1, M)])
    )  # exact, linear
    assert bool((m.abs() <= v.sqrt() * (1 + 8 * U64)).all()), (m, v)
    assert float(state["step"]) == 3.0


@pytest.mark.parametrize("seed", range(5))
def test_random_changes_of_basis_keep_the_bound(seed: int) -> None:
    """Augmentation (U_hat^T U, n x r), then truncation (P^T, r x n) on both channel modes."""
    g = torch.Generator().manual_seed(seed)
    shape = (5, 4, 3, 3)
    v = torch.rand(shape, generator=g, dtype=torch.float64) ** 4  # spread over orders of magnitude
    m = v.sqrt() * (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1)  # |m| <= sqrt(v)
    state = {"exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    maps = []
    for mode, r in ((0, 5), (1, 4)):
        Q = torch.linalg.qr(torch.randn(2 * r, 2 * r, generator=g, dtype=torch.float64)).Q
        maps.append((mode, Q[:, :r]))  # augmentation: old basis -> a rotated, larger one
    transport_state(state, shape, maps)
    new_shape = tuple(state["exp_avg"].shape)
    maps = [
        (mode, torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q[:, :r].mT)
        for mode, n, r in ((0, 10, 6), (1, 8, 3))
    ]  # truncation: P^T, (kept, n)
    transport_state(state, new_shape, maps)
    m2, v2 = state["exp_avg"], state["exp_avg_sq"]
    # each entry is a sum of at most 10 * 8 products: relative rounding below 100 u
    assert bool((m2.abs() <= v2.sqrt() * (1 + 100 * U64) + 1e-300).all())


def test_rotations_keep_the_mean_square() -> None:
    """A change of basis averages ``v``, it does not inflate it: uniform ``v`` (``m = 0``) stays
    uniform under orthogonal maps on both channel modes, and a square orthogonal map keeps
    ``sum(v)``. The ``|M|`` rule multiplied it by ``(sum_j |M_ij|)^2``, about 5 here."""
    g = torch.Generator().manual_seed(1)
    shape = (8, 6, 3, 3)
    maps = [
        (mode, torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q)
        for mode, n in ((0, 8), (1, 6))
    ]
    state = {"exp_avg": torch.zeros(shape, dtype=torch.float64)}
    state["exp_avg_sq"] = torch.full(shape, 0.25, dtype=torch.float64)
    transport_state(state, shape, maps)
    # each entry: 8 * 6 products of squares summed in two passes, relative rounding below 64 u
    assert torch.allclose(
        state["exp_avg_sq"], torch.full(shape, 0.25, dtype=torch.float64), rtol=64 * U64, atol=0
    )
    v = torch.rand(shape, generator=g, dtype=torch.float64)
    state = {"exp_avg_sq": v.clone()}
    transport_state(state, shape, maps)
    total = float(v.sum())
    assert abs(float(state["exp_avg_sq"].sum()) - total) <= 64 * U64 * total * v.numel() ** 0.5


def test_truncation_keeps_only_the_kept_mean_square() -> None:
    """A truncation (``P^T`` with fewer rows) drops what lies outside the kept coordinates: ``v``
    of each kept coordinate is the ``M^2``-weighted average of the old ones, never above their
    maximum."""
    g = torch.Generator().manual_seed(2)
    v = torch.rand(10, 4, 1, 1, generator=g, dtype=torch.float64) + 0.5
    P = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64)).Q[:, :6]
    state = {"exp_avg_sq": v.clone()}
    transport_state(state, v.shape, [(0, P.mT)])
    ref = (P.mT * P.mT) @ v[:, :, 0, 0]
    assert torch.allclose(state["exp_avg_sq"][:, :, 0, 0], ref, rtol=16 * U64, atol=0)
    assert float(state["exp_avg_sq"].max()) <= float(v.max()) * (1 + 16 * U64)


def test_signed_permutations_transport_exactly() -> None:
    """Permutations and sign flips (the only maps both rules agree on) move entries unchanged."""
    g = torch.Generator().manual_seed(0)
    v = torch.rand(3, 2, 1, 1, generator=g, dtype=torch.float64)
    m = torch.randn(3, 2, 1, 1, generator=g, dtype=torch.float64)
    Pm = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    state = {"exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    transport_state(state, v.shape, [(0, Pm)])
    perm = [1, 2, 0]
    assert torch.allclose(
        state["exp_avg_sq"], v[perm], rtol=4 * U64, atol=0
    )  # sqrt, then square: 2 roundings
    assert torch.equal(
        state["exp_avg"],
        m[perm] * torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)[:, None, None, None],
    )


def test_adam_training_keeps_its_step_bound_through_truncations() -> None:
    """TDLRT with Adam on a small network, pruning as it goes: after every step every core entry has
    ``|m| <= c sqrt(v)`` (float32 state: relative slack 1e-4, a few hundred float32 roundings)."""
    torch.manual_seed(123)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 4),
    )
    tuckerize(net)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 3, 6, 6, generator=g), torch.randint(0, 4, (64,), generator=g)
    b1, b2 = 0.9, 0.999
    opt = TDLRTOptimizer(net, 0.5, base="adam", lr=0.05, betas=(b1, b2))
    c = _adam_bound(b1, b2)
    ranks = []
    for i in range(8):
        xb, yb = x[i % 4 * 16 : (i % 4 + 1) * 16], y[i % 4 * 16 : (i % 4 + 1) * 16]

        def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
        ranks.append(opt.ranks())
        for name, layer in opt.layers.items():
            st = opt.base.state[layer.core.weight]
            m, v = st["exp_avg"].double(), st["exp_avg_sq"].double()
            excess = float((m.abs() - c * v.sqrt() * (1 + 1e-4)).max())
            assert excess <= 0.0, (
                f"step {i + 1}, layer {name}: |m| exceeds {c:.3f} sqrt(v) by {excess:.3g}"
            )
    assert ranks[-1] != ranks[0]  # the truncations (rotations) did happen


def test_augment_basis_keeps_old_basis_and_is_orthonormal() -> None:
    torch.manual_seed(0)
    U = torch.linalg.qr(torch.randn(10, 3)).Q
    for D, r_aug in (
        (torch.randn(10, 3), 6),
        (torch.randn(10, 3), 5),
        (torch.zeros(10, 3), 6),
        (U @ torch.randn(3, 3), 6),
    ):
        Q = augment_basis(U, D, r_aug)
        assert Q.shape == (10, r_aug)
        assert orthonormality_error(Q) < 1e-5
        assert torch.allclose(Q[:, :3], U, atol=1e-5)
    D = torch.randn(10, 3)  # the new directions span D's part orthogonal to U
    Q = augment_basis(U, D, 6)
    Dp = D - U @ (U.T @ D)
    assert torch.allclose(Q @ (Q.T @ Dp), Dp, atol=1e-5)


def test_truncation_rank_rule() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 0.1, 0.01])
    norm = float(s.norm())
    assert truncation_rank(s, 0.0, 1, 5) == 5  # tau = 0: nothing dropped
    assert truncation_rank(s, 0.2 * norm, 1, 5) == 3  # ||[0.1, 0.01]|| = 0.1005 < 0.2 * 4.58
    assert truncation_rank(s, 0.99 * norm, 2, 5) == 2  # rmin wins
    assert truncation_rank(s, 0.0, 1, 4) == 4  # rmax wins
