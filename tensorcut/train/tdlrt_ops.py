"""Tensor algebra of one TDLRT step on a Tucker kernel, as pure functions on tensors.

The pieces of the rank-adaptive integrator of Zangrando, Schotthöfer, Ceruti, Kusch and
Tudisco (arXiv 2305.19059), written for a core ``C`` and orthonormal factors ``U_i`` with
``W = C x_1 U_1 x_2 U_2 ...``:

* :func:`k_step_gradient` -- the gradient of the K-step variable ``K_i = U_i S_i`` (where
  ``Mat_i(C)^T = Q_i S_i^T``) obtained from the factor gradient ``dL/dU_i`` of the same
  backward pass;
* :func:`augment_basis` -- ``[U_i | new directions]`` orthonormalised, old basis first;
* :func:`mode_product` / :func:`galerkin_core` -- moving the core to new bases;
* :func:`mode_spectrum` / :func:`truncation_rank` -- the HOSVD truncation rule;
* :func:`transport_state` -- carrying optimiser moments along a change of basis.

Nothing here knows about modules or optimisers; :mod:`tensorcut.train.tdlrt` drives them.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any

import torch

__all__ = [
    "augment_basis",
    "galerkin_core",
    "k_step_gradient",
    "mode_product",
    "mode_spectrum",
    "orthonormality_error",
    "transport_state",
    "truncation_rank",
    "unfold",
]

# Optimiser-state entries that hold second moments (carried as sqrt, transported by |M|, squared).
SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg"})


def unfold(T: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: that mode as rows, the others (in order) as columns."""
    return torch.movedim(T, mode, 0).reshape(T.shape[mode], -1)


def mode_product(T: torch.Tensor, M: torch.Tensor, mode: int) -> torch.Tensor:
    """``T x_mode M`` for ``M`` of shape ``(new, old)``: replaces that mode's size ``old`` by
    ``new``.
    """
    return torch.movedim(torch.tensordot(M, T, dims=([1], [mode])), 0, mode)


def galerkin_core(C: torch.Tensor, maps: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """``C x_i M_i`` over ``(mode, M_i)`` pairs: the core expressed in new bases (``M_i = U_new^T
    U_old``).
    """
    out = C
    for mode, M in maps:
        out = mode_product(out, M.to(out.dtype), mode)
    return out


def orthonormality_error(U: torch.Tensor) -> float:
    """``max |U^T U - I|``: how far the columns of ``U`` are from orthonormal."""
    G = U.mT @ U
    return (
        float((G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)).abs().max())
        if G.numel()
        else 0.0
    )


def k_step_gradient(C: torch.Tensor, grad_U: torch.Tensor, mode: int) -> torch.Tensor:
    """Gradient of the loss with respect to ``K_i = U_i S_i`` for mode ``i``.

    With ``Mat_i(C)^T = Q_i R_i`` (reduced QR; ``S_i = R_i^T``) the kernel is
    ``Ten_i(K_i Q_i^T) x_{j != i} U_j`` and the chain rule gives
    ``dL/dU_i = dL/dK_i R_i``, so ``dL/dK_i = dL/dU_i R_i^{-1}``: one small triangular
    solve on the factor gradient from the backward pass already taken. Where ``R_i`` is not
    square or numerically singular (a core unfolding of deficient rank) ``dL/dU_i`` itself is
    returned; its span lies inside that of ``dL/dK_i``, and only the span is used next.
    """
    M = unfold(C, mode).mT  # (prod of other core sizes, r_i)
    r = M.shape[1]
    if M.shape[0] < r or r == 0:
        return grad_U
    R = torch.linalg.qr(M.double(), mode="r").R
    d = torch.diagonal(R).abs()
    if not bool(torch.isfinite(d).all()) or float(d.min()) <= 1e-7 * max(float(d.max()), 1e-300):
        return grad_U
    gK = torch.linalg.solve_triangular(R, grad_U.double(), upper=True, left=False)
    return gK.to(grad_U.dtype)


def augment_basis(U: torch.Tensor, D: torch.Tensor, r_aug: int) -> torch.Tensor:
    """Orthonormal basis of ``span[U | D]`` with ``r_aug`` columns, the first ``r`` equal to ``U``.

    ``D`` holds the new directions (the K-step update; any nonzero multiple spans the same
    space). Their components orthogonal to ``U`` are formed (twice, for stability); when
    fewer than ``D.shape[1]`` new columns fit (``r_aug < r + D.shape[1]``) the dominant ones
    (leading left singular vectors) are kept. Householder QR of ``[U | new]`` then yields an
    orthonormal matrix whose leading block reproduces ``U`` up to rounding (signs are fixed
    so it is ``U`` itself, not ``-U``). If the new directions are degenerate (e.g. a zero
    gradient) QR still returns valid orthonormal completions, which the S-step may use or the
    truncation may drop.
    """
    n, r = U.shape
    extra = min(int(r_aug), n) - r
    if extra <= 0:
        return U.clone()
    P = D - U @ (U.mT @ D)
    P = P - U @ (U.mT @ P)
    if P.shape[1] != extra:
        if P.shape[1] > extra:
            P = torch.linalg.svd(P, full_matrices=False).U[:, :extra]
        else:  # fewer directions than room: complete with random ones (QR orthonormalises them)
            fill = torch.randn(n, extra - P.shape[1], dtype=P.dtype, device=P.device)
            P = torch.cat([P, fill], dim=1)
    Q, R = torch.linalg.qr(torch.cat([U, P], dim=1), mode="reduced")
    signs = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * signs


def mode_spectrum(C: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors ``P`` (square, all of them) and singular values of ``Mat_mode(C)``.

    Computed in float64 from the small Gram matrix ``Mat Mat^T`` so that ``P`` is complete
    even when the unfolding has fewer columns than rows (1x1 kernels); descending order.
    """
    M = unfold(C, mode).double()
    evals, evecs = torch.linalg.eigh(M @ M.mT)
    evals, evecs = evals.flip(0), evecs.flip(1)
    return evecs, evals.clamp_min(0.0).sqrt()


def truncation_rank(sigma: torch.Tensor, tol: float, lo: int, hi: int) -> int:
    """Smallest ``r`` whose discarded tail ``||sigma[r:]||_2`` is below ``tol``, clipped to ``[lo,
    hi]``.

    The comparison is strict, as in the reference implementation, so ``tol = 0`` keeps every
    singular value (no truncation).
    """
    s2 = sigma.double().pow(2)
    tails = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]).sqrt()  # tails[j] = ||sigma[j:]||
    below = torch.nonzero(tails < tol)
    r = int(below[0]) if below.numel() else int(sigma.numel())
    return max(int(lo), min(r, int(hi)))


def transport_state(
    state: MutableMapping[str, Any],
    old_shape: Iterable[int],
    maps: Sequence[tuple[int, torch.Tensor]],
) -> None:
    """Carry an optimiser's per-parameter state along the core's change of basis, in place.

    First moments (SGD ``momentum_buffer``, Adam ``exp_avg``) are transported like the core,
    ``m x_i M_i``. Second moments (:data:`SECOND_MOMENTS`, Adam ``exp_avg_sq``) are mean squares,
    and go as ``v x_i (M_i * M_i)`` (entrywise squares of ``M_i``): the mean square of a new
    coordinate ``sum_j M_ij g_j`` when the old coordinates' gradients are uncorrelated. Rows of
    ``M_i`` have norm <= 1, so ``v`` is a weighted average of old entries: no cancellation (the
    authors' ``(sqrt(v) x_i M_i)^2``, signed, can cancel and leave an entry with a first moment
    hundreds of times its ``sqrt(v)``: Adam steps of hundreds of learning rates) and no inflation
    (``(sqrt(v) x_i |M_i|)^2``, the rule used before, multiplies ``v`` by up to the number of
    coordinates a rotation mixes, ``(sum_j |M_ij|)^2``: the truncation rotates the core every
    step, and Adam's steps on it shrank until TDLRT at full rank trailed dense training by 7
    points, benchmarks/results/tdlrt.md). Adam's step bound is kept as well: if
    ``|m| <= c sqrt(v)`` held before (``c`` the largest ratio in the tensor), each transported
    entry whose ``|m|`` exceeds ``c sqrt(v)`` gets ``v = (m / c)^2``. Permutations and sign flips
    (and the zero-padding of an augmentation) move every entry unchanged. Scalars (Adam ``step``)
    are kept.
    """
    old_shape = tuple(old_shape)
    first = state.get("exp_avg")
    bound = (
        _moment_ratio(first, state.get("exp_avg_sq"))
        if isinstance(first, torch.Tensor) and tuple(first.shape) == old_shape
        else None
    )
    for key in list(state.keys()):
        val = state[key]
        if not isinstance(val, torch.Tensor) or tuple(val.shape) != old_shape or val.ndim == 0:
            continue
        if key in SECOND_MOMENTS:
            state[key] = galerkin_core(val.clamp_min(0), [(m, M * M) for m, M in maps])
        else:
            state[key] = galerkin_core(val, maps).contiguous()
    if bound is not None and bound > 0:
        m = state["exp_avg"]
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            v = state.get(key)
            if isinstance(v, torch.Tensor) and v.shape == m.shape:
                state[key] = torch.maximum(v, (m / bound).square()).contiguous()


def _moment_ratio(m: torch.Tensor, v: Any) -> float | None:
    """``max |m| / sqrt(v)`` over the entries with ``v > 0`` (``None`` without a usable ``v``)."""
    if not isinstance(v, torch.Tensor) or v.shape != m.shape:
        return None
    pos = v > 0
    if not bool(pos.any()):
        return None
    return float((m[pos].abs() / v[pos].sqrt()).max())
