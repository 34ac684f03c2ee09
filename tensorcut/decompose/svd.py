"""Truncated and randomized SVD, and the rank-from-error rules every decomposition shares.

Definitions (DESIGN.md): for singular values ``S`` of ``M`` and a kept rank ``k``,

* ``eps`` bounds the relative Frobenius error ``sqrt(sum_{i>k} S_i^2 / sum_i S_i^2)``;
* ``energy`` is the fraction of squared norm kept, ``sum_{i<=k} S_i^2 / sum_i S_i^2``.

Both rules pick the *smallest* ``k >= 1`` that satisfies them. The same helpers validate
explicit ranks: a rank below 1 raises :class:`~tensorcut.errors.TensorcutError`, a rank
above what the tensor admits is clamped with a :class:`RankClampWarning` naming both values.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence

import torch

from tensorcut.errors import TensorcutError

__all__ = [
    "RankClampWarning",
    "clamp_rank",
    "rank_from_spectrum",
    "truncated_svd",
]


class RankClampWarning(UserWarning):
    """A requested rank exceeded what the tensor admits and was lowered."""


def clamp_rank(requested: int, maximum: int, *, name: str = "rank") -> int:
    """Validate ``requested`` and clamp it to ``[1, maximum]``, warning when it is lowered.

    Raises :class:`TensorcutError` for non-integers and ranks below 1 (saying the valid range).
    """
    if isinstance(requested, bool) or not hasattr(requested, "__index__"):
        raise TensorcutError(f"{name} must be an integer in [1, {maximum}]; got {requested!r}")
    r = int(requested.__index__())
    if r < 1:
        raise TensorcutError(f"{name} must be in [1, {maximum}]; got {r} (use a positive rank)")
    if r > maximum:
        warnings.warn(
            f"{name} {r} clamped to {maximum}: the tensor admits at most {maximum}",
            RankClampWarning,
            stacklevel=3,
        )
        return int(maximum)
    return r


@contextlib.contextmanager
def small_lapack(t: torch.Tensor, limit: int | None = 1 << 16) -> Iterator[None]:
    """Run a LAPACK call on a small CPU tensor on one thread.

    Small means ``numel <= limit`` (``None``: any size).

    Small factorizations gain nothing from threads, and a threaded LAPACK on a busy machine
    can stall for a scheduler time slice (milliseconds) per call -- which adds up inside
    iterative methods. The previous thread count is restored on exit.
    """
    if (
        t.device.type != "cpu"
        or (limit is not None and t.numel() > limit)
        or torch.get_num_threads() == 1
    ):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def check_tolerance(eps: float | None, energy: float | None) -> float | None:
    """Turn ``eps`` / ``energy`` into one bound on the squared relative error (or ``None``).

    ``energy`` keeps that fraction of the squared norm, i.e. ``eps = sqrt(1 - energy)``.
    """
    if eps is not None and energy is not None:
        raise TensorcutError("give eps or energy, not both")
    if eps is not None:
        e = float(eps)
        if not (e >= 0.0) or math.isinf(e):
            raise TensorcutError(
                f"eps must be a finite number >= 0 (a relative error); got {eps!r}"
            )
        return e * e
    if energy is not None:
        f = float(energy)
        if not (0.0 < f <= 1.0):
            raise TensorcutError(
                f"energy must be in (0, 1] (fraction of squared norm kept); got {energy!r}"
            )
        return 1.0 - f
    return None


def rank_for_budget(s2: torch.Tensor, budget: float, total: float | None = None) -> int:
    """Smallest ``k >= 1`` whose discarded energy ``sum_{i>=k} s2_i`` is ``<= budget``.

    ``total`` adds energy that lies outside ``s2`` (e.g. outside a randomized sketch);
    returns ``len(s2) + 1`` when even keeping all of ``s2`` is not enough.
    """
    s2 = s2.detach().to(device="cpu", dtype=torch.float64)
    n = s2.numel()
    outside = 0.0 if total is None else max(float(total) - float(s2.sum()), 0.0)
    # discarded[k] = energy dropped when keeping the first k values, k = 0..n
    tails = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])
    discarded = torch.cat([tails, torch.zeros(1, dtype=torch.float64)]) + outside
    ok = torch.nonzero(discarded[1:] <= budget)
    if ok.numel() == 0:
        return n + 1
    return int(ok[0, 0]) + 1


def rank_from_spectrum(
    S: torch.Tensor, *, eps: float | None = None, energy: float | None = None
) -> int:
    """Smallest rank ``k >= 1`` meeting ``eps`` or ``energy``.

    ``eps`` is a relative Frobenius error, ``energy`` the kept fraction.

    ``S`` are singular values (any order is accepted; they are sorted descending).
    Never returns 0: an all-zero spectrum gives 1.
    """
    tol2 = check_tolerance(eps, energy)
    if tol2 is None:
        raise TensorcutError("rank_from_spectrum needs eps or energy")
    return rank_from_s(S, tol2)


def rank_from_s(S: torch.Tensor, tol2: float) -> int:
    """:func:`rank_from_spectrum` with the squared relative error budget ``tol2``."""
    s = torch.as_tensor(S).detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if s.numel() == 0:
        raise TensorcutError("rank_from_spectrum got an empty spectrum")
    s2 = torch.sort(s.abs(), descending=True).values ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 1
    return min(rank_for_budget(s2, tol2 * total), s.numel())


def as_float(M: torch.Tensor, what: str = "input") -> tuple[torch.Tensor, torch.dtype]:
    """Return ``M`` in a dtype LAPACK handles (float32/float64) and the dtype to give back."""
    if not isinstance(M, torch.Tensor):
        raise TensorcutError(f"{what} must be a torch.Tensor; got {type(M).__name__}")
    if not M.is_floating_point():
        raise TensorcutError(f"{what} must be a floating-point tensor; got {M.dtype}")
    if M.dtype in (torch.float32, torch.float64):
        return M, M.dtype
    return M.to(torch.float32), M.dtype


def fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the largest-magnitude entry of every column of ``U`` positive (deterministic output)."""
    if U.numel() == 0:
        return U, Vh
    idx = U.abs().argmax(dim=0, keepdim=True)
    sign = torch.sign(torch.gather(U, 0, idx)).reshape(-1)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, Vh * sign[:, None]


def gaussian(shape: Sequence[int], *, seed: int, like: torch.Tensor) -> torch.Tensor:
    """Seeded standard normal tensor drawn on the CPU, so results match across devices."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(
        device=like.device, dtype=like.dtype
    )


def _range_finder(M: torch.Tensor, size: int, n_iter: int, seed: int) -> torch.Tensor:
    """Orthonormal basis of an approximate range of ``M`` (Halko et al., power iterations)."""
    Y = M @ gaussian((M.shape[1], size), seed=seed, like=M)
    small = max(M.shape) * size <= 1 << 18  # every QR below is at most this big
    with small_lapack(Y, limit=None) if small else contextlib.nullcontext():
        Q = torch.linalg.qr(Y).Q
        for _ in range(n_iter):
            Q = torch.linalg.qr(M.mT @ Q).Q
            Q = torch.linalg.qr(M @ Q).Q
    return Q


def _sketch_svd(
    M: torch.Tensor, size: int, n_iter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    Q = _range_finder(M, size, n_iter, seed)
    B = Q.mT @ M
    with small_lapack(B):
        Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return Q @ Ub, S, Vh


def truncated_svd(
    M: torch.Tensor,
    rank: int | None = None,
    *,
    eps: float | None = None,
    energy: float | None = None,
    randomized: bool = False,
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-truncated SVD ``M ~= U @ diag(S) @ Vh`` of a 2-D tensor.

    Give at most one of ``rank`` (clamped to ``min(M.shape)`` with a warning), ``eps`` or
    ``energy``; with none the full thin SVD is returned. ``randomized=True`` uses a Gaussian
    sketch of ``rank + oversample`` columns refined by ``n_iter`` power iterations (Halko,
    Martinsson & Tropp 2011) -- much cheaper for large matrices and small ranks. With ``eps`` /
    ``energy`` the sketch grows by doubling until the error budget (measured against the
    exact ``||M||_F``) is met, falling back to the exact SVD. Signs are fixed so the largest
    entry of each left singular vector is positive, and the sketch is seeded, so results are
    deterministic. Works on CPU and GPU; returns tensors in ``M``'s dtype and device.
    """
    if sum(x is not None for x in (rank, eps, energy)) > 1:
        raise TensorcutError("give at most one of rank, eps, energy to truncated_svd")
    M, out_dtype = as_float(M, "M")
    if M.ndim != 2:
        raise TensorcutError(f"truncated_svd needs a 2-D matrix; got shape {tuple(M.shape)}")
    if M.numel() == 0:
        raise TensorcutError(f"truncated_svd got an empty matrix of shape {tuple(M.shape)}")
    if not bool(torch.isfinite(M).all()):
        raise TensorcutError("truncated_svd input contains NaN or Inf; clean the tensor first")
    if oversample < 0 or n_iter < 0:
        raise TensorcutError(f"oversample and n_iter must be >= 0; got {oversample}, {n_iter}")
    full = min(M.shape)
    k = clamp_rank(rank, full) if rank is not None else None
    tol2 = check_tolerance(eps, energy)

    U: torch.Tensor | None = None
    S: torch.Tensor | None = None
    Vh: torch.Tensor | None = None
    if randomized and k is not None and k + oversample < full:
        U, S, Vh = _sketch_svd(M, k + oversample, n_iter, seed)
    elif randomized and tol2 is not None:
        total = float(torch.linalg.vector_norm(M, dtype=torch.float64)) ** 2
        size = min(max(2 * oversample, 16), full)
        while size + oversample < full:
            U, S, Vh = _sketch_svd(M, size + oversample, n_iter, seed)
            k = rank_for_budget(S.double() ** 2, tol2 * total, total)
            if k <= size:
                break
            U = S = Vh = None
            size *= 2
    if U is None:
        with small_lapack(M):
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        if tol2 is not None:
            k = rank_from_s(S, tol2)
    if k is None:
        k = full
    assert U is not None and S is not None and Vh is not None  # the exact SVD ran otherwise
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    U, Vh = fix_signs(U, Vh)
    if out_dtype != M.dtype:
        U, S, Vh = U.to(out_dtype), S.to(out_dtype), Vh.to(out_dtype)
    return U, S, Vh
