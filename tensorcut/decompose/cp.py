"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares, built on GEMMs.

``T ~= sum_r weights[r] * a^(1)_r o a^(2)_r o ... o a^(N)_r`` with unit-norm factor columns.

How one ALS sweep works (and why it is fast):

* The modes are split once into two groups ``L | R`` chosen so ``prod(L) + prod(R)`` is
  smallest, and ``T`` is viewed as a ``prod(L) x prod(R)`` matrix. One GEMM with the
  Khatri-Rao product of the ``R`` factors gives a ``(prod(L), rank)`` partial MTTKRP that
  serves *every* mode in ``L`` (their updates only need the ``R`` factors, which do not move
  meanwhile); a second GEMM serves the ``R`` modes. Two GEMMs per sweep instead of one per
  mode, no Python loop over the rank, and no Khatri-Rao product of more than one group.
* Each mode solves the normal equations with the Hadamard product of the other factors'
  Gram matrices plus a proximal Tikhonov term ``mu * ||A - A_prev||^2`` (``mu = reg``; factor
  columns are kept at unit norm, so the Gram diagonals are 1 and ``reg`` is scale-free).
  It keeps every step bounded when components become nearly collinear (the "swamps" that
  lead to diverging norms) yet does not bias the fixed point, so exactly low-rank tensors
  are still recovered exactly.
* The fit is tracked from quantities the sweep already has (``<T, X>`` from the last
  MTTKRP, ``||X||^2`` from the Gram matrices), so no reconstruction per iteration.
* NaN/Inf and component norms that grow past ``max_norm_ratio * ||T||`` end a restart;
  restarts keep the best fit; if every restart fails, :class:`ConvergenceError` is raised
  and the caller may fall back to, e.g., Tucker.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tensorcut.decompose.svd import as_float, clamp_rank, gaussian, small_lapack
from tensorcut.errors import ConvergenceError, TensorcutError

__all__ = ["CPResult", "cp_als", "cp_max_rank", "cp_to_tensor", "khatri_rao"]


@dataclass
class CPResult:
    """Result of :func:`cp_als`.

    Weights ``(R,)`` (sorted, descending) and unit-norm factors ``(n_k, R)``.
    """

    weights: torch.Tensor
    factors: list[torch.Tensor]
    rel_error: float
    n_iter: int
    converged: bool
    message: str

    @property
    def rank(self) -> int:
        """Number of rank-one components."""
        return int(self.weights.shape[0])

    def to_tensor(self) -> torch.Tensor:
        """Reconstruct the full tensor."""
        return cp_to_tensor(self.weights, self.factors)


def khatri_rao(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product; the first matrix's row index varies slowest (row-major)."""
    out = mats[0]
    for M in mats[1:]:
        out = (out[:, None, :] * M[None, :, :]).reshape(-1, out.shape[1])
    return out


def cp_max_rank(shape: Sequence[int]) -> int:
    """Trivial upper bound of the CP rank: the product of all sizes but the largest.

    Every tensor is an exact sum of that many rank-one terms (its fibres along the largest
    mode), so a larger rank is never needed.
    """
    sizes = [int(s) for s in shape]
    return math.prod(sizes) // max(sizes)


def _best_split(shape: Sequence[int]) -> tuple[list[int], int]:
    """Mode order ``perm`` and split ``h`` minimising ``prod + prod``.

    The two groups are the modes ``perm[:h] | perm[h:]``.
    """
    N = len(shape)
    best: tuple[int, list[int], int] | None = None
    for h in range(1, N // 2 + 1):
        for left in itertools.combinations(range(N), h):
            right = [m for m in range(N) if m not in left]
            cost = math.prod(shape[m] for m in left) + math.prod(shape[m] for m in right)
            if best is None or cost < best[0]:
                best = (cost, list(left) + right, h)
    assert best is not None
    return best[1], best[2]


def cp_to_tensor(weights: torch.Tensor | None, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense tensor of a CP decomposition (``weights=None`` means all ones).

    Built as one GEMM between the Khatri-Rao products of two balanced mode groups.
    """
    if len(factors) == 0:
        raise TensorcutError("cp_to_tensor needs at least one factor")
    R = factors[0].shape[1]
    if any(F.ndim != 2 or F.shape[1] != R for F in factors):
        raise TensorcutError(
            f"all CP factors must be (n_k, {R}); got {[tuple(F.shape) for F in factors]}"
        )
    w = (
        torch.ones(R, dtype=factors[0].dtype, device=factors[0].device)
        if weights is None
        else weights
    )
    shape = [int(F.shape[0]) for F in factors]
    if len(factors) == 1:
        return factors[0] @ w
    perm, h = _best_split(shape)
    left = khatri_rao([factors[m] for m in perm[:h]]) * w
    right = khatri_rao([factors[m] for m in perm[h:]])
    out = (left @ right.mT).reshape([shape[m] for m in perm])
    return out.permute([perm.index(m) for m in range(len(shape))])


def _exact_fibres(T: torch.Tensor) -> CPResult:
    """Exact CP at the trivial rank bound: one term per fibre along the largest mode."""
    shape = list(T.shape)
    j = max(range(T.ndim), key=lambda m: shape[m])
    others = [m for m in range(T.ndim) if m != j]
    P = math.prod(shape[m] for m in others)
    fibres = torch.movedim(T, j, -1).reshape(P, shape[j]).mT  # (n_j, P), columns in row-major order
    norms = torch.linalg.vector_norm(fibres, dim=0)
    factors: list[torch.Tensor] = [torch.empty(0)] * T.ndim
    factors[j] = fibres / torch.where(norms > 0, norms, torch.ones_like(norms))
    idx = torch.arange(P, device=T.device)
    for m in reversed(others):
        factors[m] = torch.nn.functional.one_hot(idx % shape[m], shape[m]).mT.to(T.dtype)
        idx = idx // shape[m]
    return _sorted(CPResult(norms, factors, 0.0, 0, True, "exact: rank equals the fibre bound"))


def _sorted(res: CPResult) -> CPResult:
    order = torch.argsort(res.weights, descending=True)
    res.weights = res.weights[order]
    res.factors = [F[:, order] for F in res.factors]
    return res


def _contract(Y: torch.Tensor, mats: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """MTTKRP for mode ``n`` of a group.

    Contracts ``Y (n_1, .., n_k, R)`` with the group's other factors.
    """
    letters = "abcdefghijklmnopqstuvwxyz"
    k = len(mats)
    if k == 1:
        return Y
    if (
        k == 2
    ):  # the common case (4-mode kernels): a broadcast product and a sum beat einsum's overhead
        return (Y * mats[1]).sum(1) if n == 0 else (Y * mats[0][:, None, :]).sum(0)
    ins = [letters[:k] + "r"] + [letters[m] + "r" for m in range(k) if m != n]
    operands = [Y] + [mats[m] for m in range(k) if m != n]
    return torch.einsum(",".join(ins) + "->" + letters[n] + "r", *operands)


def _solve(V: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``rhs @ inv(V)`` for a symmetric positive (semi)definite ``V``."""
    with small_lapack(V, limit=None):
        L, info = torch.linalg.cholesky_ex(V)
        if int(info) == 0:
            return torch.cholesky_solve(rhs.mT, L).mT
        return rhs @ torch.linalg.pinv(V, hermitian=True)


def _init_factors(
    T: torch.Tensor, rank: int, init: str, seed: int, skip: int
) -> list[torch.Tensor]:
    """Initial factors: Gaussian, or with ``init="svd"`` the leading left singular vectors.

    The singular vectors are those of each unfolding, padded randomly.
    """
    factors = []
    for m in range(T.ndim):
        G = gaussian((T.shape[m], rank), seed=seed * 1000 + m, like=T)
        if init == "svd" and m != skip:
            Tm = torch.movedim(T, m, 0).reshape(T.shape[m], -1)
            with small_lapack(Tm):
                U = torch.linalg.svd(Tm, full_matrices=False).U
            k = min(rank, U.shape[1])
            G = torch.cat([U[:, :k], G[:, k:] / math.sqrt(T.shape[m])], dim=1)
        factors.append(G / torch.linalg.vector_norm(G, dim=0).clamp_min(torch.finfo(T.dtype).tiny))
    return factors


def _run(
    Tm: torch.Tensor,
    dims: list[int],
    h: int,
    factors: list[torch.Tensor],
    n_iter_max: int,
    tol: float,
    reg: float,
    max_norm_ratio: float,
    norm2: float,
) -> tuple[torch.Tensor, list[torch.Tensor], int, bool, str]:
    """ALS sweeps on the permuted matrix view ``Tm``.

    Returns weights, factors, iterations, whether it converged, and a message.
    """
    N, R = len(factors), factors[0].shape[1]
    eye = torch.eye(R, dtype=Tm.dtype, device=Tm.device)
    reg_eye = reg * eye
    f64 = Tm.dtype == torch.float64
    weights = torch.ones(R, dtype=Tm.dtype, device=Tm.device)
    grams = [F.mT @ F for F in factors]
    norm = math.sqrt(norm2)
    floor = 10.0 * math.sqrt(torch.finfo(Tm.dtype).eps)
    tol = max(tol, 10.0 * torch.finfo(Tm.dtype).eps)
    tiny = torch.finfo(Tm.dtype).tiny
    prev = math.inf
    it = 0
    for it in range(1, n_iter_max + 1):
        for group, lo, hi in ((0, 0, h), (1, h, N)):
            if group == 0:
                Y = Tm @ khatri_rao(factors[h:])
            else:
                Y = Tm.mT @ khatri_rao(factors[:h])
            Y = Y.reshape(*dims[lo:hi], R)
            for n in range(lo, hi):
                M = _contract(Y, factors[lo:hi], n - lo)
                others = [grams[m] for m in range(N) if m != n]
                V = others[0]
                for G in others[1:]:
                    V = V * G
                # unit-norm columns make diag(V) = 1, so mu = reg is already scale-free
                A = _solve(V + reg_eye, torch.addcmul(M, factors[n], weights, value=reg))
                weights = torch.linalg.vector_norm(A, dim=0)
                factors[n] = A / weights.clamp_min(tiny)
                grams[n] = factors[n].mT @ factors[n]
        # fit from the last mode's MTTKRP: ||T - X||^2 = ||T||^2 - 2 <T, X> + ||X||^2
        if not bool(torch.isfinite(weights).all()):
            return weights, factors, it, False, f"NaN/Inf in the factors at iteration {it}"
        wmax = float(weights.max())
        if wmax > max_norm_ratio * norm:
            return (
                weights,
                factors,
                it,
                False,
                (
                    f"component norms diverging at iteration {it} (largest weight {wmax:.3g} > "
                    f"{max_norm_ratio:g} x ||T||; degenerate CP, try a lower rank)"
                ),
            )
        inner = float((M * A).sum() if f64 else (M.double() * A.double()).sum())
        H = grams[0] if f64 else grams[0].double()
        for G in grams[1:]:
            H = H * (G if f64 else G.double())
        w = weights if f64 else weights.double()
        err2 = norm2 - 2.0 * inner + float(w @ H @ w)
        rel = math.sqrt(max(err2, 0.0) / norm2)
        if rel < floor:  # below the estimate's rounding floor: measure the fit directly
            X = (khatri_rao(factors[:h]) * weights) @ khatri_rao(factors[h:]).mT
            rel = float(torch.linalg.vector_norm(Tm - X, dtype=torch.float64)) / norm
        if abs(prev - rel) < tol or rel < 100.0 * torch.finfo(Tm.dtype).eps:
            return weights, factors, it, True, f"converged in {it} iterations"
        prev = rel
    msg = f"stopped at n_iter_max={n_iter_max} before the fit changed by less than tol={tol:g}"
    return weights, factors, it, False, msg


def cp_als(
    T: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-7,
    init: str = "svd",
    n_restarts: int = 1,
    seed: int = 0,
    reg: float = 1e-6,
    max_norm_ratio: float = 1e4,
) -> CPResult:
    """CP decomposition of ``T`` with ``rank`` components by regularised ALS.

    ``rank`` above :func:`cp_max_rank` is clamped (with a warning); at that bound the exact
    fibre decomposition is returned without iterating. ``init="svd"`` starts from leading
    singular vectors of the unfoldings (the first restart only; later restarts are random),
    ``init="random"`` from seeded Gaussians. Stops when the relative error changes by less
    than ``tol`` (raised to ``10 * machine eps`` of the dtype). ``reg`` scales the proximal
    Tikhonov term; ``max_norm_ratio`` caps the component norms relative to ``||T||_F``.
    Restarts (``n_restarts``) keep the best fit. Raises :class:`ConvergenceError` for NaN/Inf
    input and when every restart produced NaN/Inf or diverging components. Deterministic for a
    given ``seed``; runs on the tensor's device.
    """
    if not isinstance(T, torch.Tensor):
        raise TensorcutError(f"cp_als needs a torch.Tensor; got {type(T).__name__}")
    T, out_dtype = as_float(T, "T")
    if T.ndim < 2:
        raise TensorcutError(
            f"cp_als needs a tensor with at least 2 modes; got shape {tuple(T.shape)}"
        )
    if not bool(torch.isfinite(T).all()):
        raise ConvergenceError(
            "CP input contains NaN or Inf; clean the tensor (or leave this layer dense)"
        )
    if init not in ("svd", "random"):
        raise TensorcutError(f"init must be 'svd' or 'random'; got {init!r}")
    if n_restarts < 1 or n_iter_max < 0 or reg < 0 or tol < 0:
        raise TensorcutError("need n_restarts >= 1, n_iter_max >= 0, reg >= 0, tol >= 0")
    bound = cp_max_rank(T.shape)
    R = clamp_rank(rank, bound, name="CP rank")
    if R == bound:
        return _cast(_exact_fibres(T), out_dtype)
    norm2 = float(torch.linalg.vector_norm(T, dtype=torch.float64)) ** 2
    if norm2 == 0.0:
        zeros = torch.zeros(R, dtype=T.dtype, device=T.device)
        factors = _init_factors(T, R, "random", seed, -1)
        return _cast(CPResult(zeros, factors, 0.0, 0, True, "zero tensor"), out_dtype)

    perm, h = _best_split(list(T.shape))
    Tp = T.permute(perm)
    dims = list(Tp.shape)
    Tm = Tp.reshape(math.prod(dims[:h]), -1)
    best: CPResult | None = None
    failures = []
    for restart in range(n_restarts):
        how = init if restart == 0 else "random"
        start = _init_factors(T, R, how, seed + restart, skip=perm[0])
        with small_lapack(Tm, limit=1 << 16):  # small problems: threads cost more than they give
            weights, fp, it, ok, msg = _run(
                Tm, dims, h, [start[m] for m in perm], n_iter_max, tol, reg, max_norm_ratio, norm2
            )
        if not bool(torch.isfinite(weights).all()) or msg.startswith("component norms"):
            failures.append(f"restart {restart}: {msg}")
            continue
        factors = [fp[perm.index(m)] for m in range(T.ndim)]
        approx = cp_to_tensor(weights, factors)
        rel = float(torch.linalg.vector_norm(T - approx, dtype=torch.float64)) / math.sqrt(norm2)
        if best is None or rel < best.rel_error:
            best = CPResult(weights, factors, rel, it, ok, msg)
    if best is None:
        raise ConvergenceError(
            f"CP-ALS rank {R} failed in all {n_restarts} restart(s): " + "; ".join(failures)
        )
    return _cast(_sorted(best), out_dtype)


def _cast(res: CPResult, dtype: torch.dtype) -> CPResult:
    if res.weights.dtype != dtype:
        res.weights = res.weights.to(dtype)
        res.factors = [F.to(dtype) for F in res.factors]
    return res
