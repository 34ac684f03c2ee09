"""Tensor-train decomposition by TT-SVD (Oseledets 2011), with an error bound.

``T[i_1, ..., i_d] = G_1[:, i_1, :] @ G_2[:, i_2, :] @ ... @ G_d[:, i_d, :]`` with cores
``G_k`` of shape ``(r_{k-1}, n_k, r_k)`` and ``r_0 = r_d = 1``.

Error bound: TT-SVD truncates ``d - 1`` successive unfoldings; the squared error of the
result is at most the sum of the squared discarded tails (Oseledets, Thm 2.2). With ``eps``
each step keeps the smallest rank whose tail is at most ``delta = eps * ||T||_F / sqrt(d - 1)``,
so ``||T - TT||_F <= eps * ||T||_F``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tensorcut.decompose.svd import (
    as_float,
    check_tolerance,
    clamp_rank,
    fix_signs,
    rank_for_budget,
    small_lapack,
)
from tensorcut.errors import TensorcutError

__all__ = ["tt_max_ranks", "tt_svd", "tt_to_tensor"]


def tt_max_ranks(shape: Sequence[int]) -> tuple[int, ...]:
    """Largest useful internal TT ranks ``r_1..r_{d-1}``.

    ``r_k = min(prod(n_1..n_k), prod(n_{k+1}..n_d))``.
    """
    sizes = [int(s) for s in shape]
    return tuple(
        min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)
    )


def tt_svd(
    T: torch.Tensor,
    ranks: int | Sequence[int] | None = None,
    *,
    eps: float | None = None,
    energy: float | None = None,
) -> list[torch.Tensor]:
    """TT cores of ``T`` (``d`` tensors of shape ``(r_{k-1}, n_k, r_k)``, ``r_0 = r_d = 1``).

    ``ranks``: the ``d - 1`` internal ranks (an int means all); each is clamped to
    :func:`tt_max_ranks` with a warning. ``eps`` bounds the relative Frobenius error (split as
    ``eps / sqrt(d - 1)`` per step, see the module docstring); ``energy`` means
    ``eps = sqrt(1 - energy)``. With both ``ranks`` and ``eps``, the ranks are caps. With
    neither, the decomposition is exact (full ranks).
    """
    T, out_dtype = as_float(T, "T")
    if T.ndim < 2:
        raise TensorcutError(
            f"tt_svd needs a tensor with at least 2 modes; got shape {tuple(T.shape)}"
        )
    if not bool(torch.isfinite(T).all()):
        raise TensorcutError("tt_svd input contains NaN or Inf; clean the tensor first")
    d = T.ndim
    shape = [int(s) for s in T.shape]
    maxr = tt_max_ranks(shape)
    tol2 = check_tolerance(eps, energy)
    if ranks is None:
        caps = list(maxr)
    else:
        req = [ranks] * (d - 1) if not isinstance(ranks, Sequence) else list(ranks)
        if len(req) != d - 1:
            raise TensorcutError(
                f"tt_svd needs {d - 1} internal ranks for a {d}-mode tensor; got {len(req)}"
            )
        caps = [
            clamp_rank(r, m, name=f"TT rank r_{k + 1}")
            for k, (r, m) in enumerate(zip(req, maxr, strict=True))
        ]
    budget = None
    if tol2 is not None:
        budget = tol2 * float(torch.linalg.vector_norm(T, dtype=torch.float64)) ** 2 / (d - 1)

    cores = []
    r_prev = 1
    C = T.reshape(1, -1)
    for k in range(d - 1):
        C = C.reshape(r_prev * shape[k], -1)
        with small_lapack(C):
            U, S, Vh = torch.linalg.svd(C, full_matrices=False)
        r = min(caps[k], S.numel())
        if budget is not None:
            r = min(r, rank_for_budget(S.double() ** 2, budget))
        U, Vh = fix_signs(U[:, :r], Vh[:r])
        cores.append(U.reshape(r_prev, shape[k], r))
        C = S[:r, None] * Vh
        r_prev = r
    cores.append(C.reshape(r_prev, shape[-1], 1))
    return [G.to(out_dtype) for G in cores]


def tt_to_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract TT cores back into the full tensor of shape ``(n_1, ..., n_d)``."""
    if len(cores) == 0:
        raise TensorcutError("tt_to_tensor needs at least one core")
    shape = []
    out = None
    for k, G in enumerate(cores):
        if G.ndim != 3:
            raise TensorcutError(
                f"TT core {k} must be 3-D (r_prev, n, r); got shape {tuple(G.shape)}"
            )
        shape.append(G.shape[1])
        if out is None:
            if G.shape[0] != 1:
                raise TensorcutError(f"the first TT core must have r_0 = 1; got {G.shape[0]}")
            out = G.reshape(G.shape[1], G.shape[2])
        else:
            if G.shape[0] != out.shape[1]:
                raise TensorcutError(
                    f"TT core {k} has r_prev={G.shape[0]} but the previous rank is {out.shape[1]}"
                )
            out = (out @ G.reshape(G.shape[0], -1)).reshape(-1, G.shape[2])
    if out.shape[1] != 1:  # type: ignore[union-attr]
        raise TensorcutError(f"the last TT core must have r_d = 1; got {out.shape[1]}")  # type: ignore[union-attr]
    return out.reshape(shape)  # type: ignore[union-attr]
