"""Tucker decompositions: HOSVD, HOOI, and Tucker-2 over the channel modes of a conv kernel.

A Tucker decomposition writes ``T ~= core x_1 U_1 x_2 U_2 ... x_N U_N`` with orthonormal
factor matrices ``U_n`` of shape ``(n_n, r_n)``. A factor may be ``None``: that mode is not
decomposed (the core keeps its full size there), which is how Tucker-2 leaves the spatial
modes of a ``(OUT, IN, KH, KW)`` kernel alone.

Error budget for ``eps``: truncated HOSVD satisfies
``||T - T_hat||^2 <= sum_n sum_{i > r_n} sigma_i(T_(n))^2`` (De Lathauwer et al. 2000), so each of
the ``N`` decomposed modes keeps the smallest rank whose discarded squared energy is at most
``eps^2 ||T||^2 / N`` (a per-mode relative error of ``eps / sqrt(N)``). The total relative error
is then at most ``eps``; HOOI starts from HOSVD and keeps its best iterate, so its error
never exceeds HOSVD's and the bound still holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tensorcut.decompose.svd import (
    as_float,
    check_tolerance,
    clamp_rank,
    rank_from_s,
    small_lapack,
)
from tensorcut.errors import TensorcutError

__all__ = ["TuckerResult", "hooi", "hosvd", "mode_dot", "tucker2", "tucker_to_tensor"]

RankSpec = int | Sequence[int | None] | None


@dataclass
class TuckerResult:
    """A Tucker decomposition: ``core`` and one factor (or ``None``) per mode.

    ``rel_error`` is ``||T - T_hat||_F / ||T||_F`` measured on the reconstruction;
    ``n_iter`` counts HOOI sweeps (0 for plain HOSVD).
    """

    core: torch.Tensor
    factors: list[torch.Tensor | None]
    rel_error: float
    n_iter: int = 0
    converged: bool = True
    message: str = field(default="")

    @property
    def ranks(self) -> tuple[int, ...]:
        """Core shape: the rank of every mode (the full size for undecomposed modes)."""
        return tuple(self.core.shape)

    def to_tensor(self) -> torch.Tensor:
        """Reconstruct the full tensor."""
        return tucker_to_tensor(self.core, self.factors)


def mode_dot(T: torch.Tensor, M: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` product ``T x_mode M``: contracts ``M``'s columns with that mode of ``T``."""
    return torch.movedim(torch.tensordot(M, T, dims=([1], [mode])), 0, mode)


def _unfold(T: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.movedim(T, mode, 0).reshape(T.shape[mode], -1)


def tucker_to_tensor(core: torch.Tensor, factors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``core x_1 U_1 ... x_N U_N``; a ``None`` factor leaves that mode as it is."""
    if len(factors) != core.ndim:
        raise TensorcutError(
            f"need one factor (or None) per core mode: core has {core.ndim}, got {len(factors)}"
        )
    out = core
    for n, U in enumerate(factors):
        if U is None:
            continue
        if U.ndim != 2 or U.shape[1] != out.shape[n]:
            raise TensorcutError(
                f"factor {n} has shape {tuple(U.shape)}; expected (n, {out.shape[n]})"
            )
        out = mode_dot(out, U, n)
    return out


def _rel_error(T: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(torch.linalg.vector_norm(T, dtype=torch.float64))
    if norm == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(T - approx, dtype=torch.float64)) / norm


def _resolve(
    T: torch.Tensor,
    ranks: RankSpec,
    modes: Sequence[int] | None,
    eps: float | None,
    energy: float | None,
) -> tuple[list[int], dict[int, int] | None, float | None]:
    """Work out which modes to decompose and either their explicit ranks or the error budget."""
    tol2 = check_tolerance(eps, energy)
    N = T.ndim
    if ranks is not None and tol2 is not None:
        raise TensorcutError("give ranks or eps/energy, not both")
    rank_of: dict[int, int] | None
    if isinstance(ranks, Sequence) and not isinstance(ranks, str):
        if len(ranks) != N:
            raise TensorcutError(
                "ranks needs one entry (int or None) per mode: "
                f"tensor has {N} modes, got {len(ranks)}"
            )
        if modes is not None:
            raise TensorcutError(
                "with a per-mode ranks sequence, mark skipped modes with None instead of modes="
            )
        explicit = {n: r for n, r in enumerate(ranks) if r is not None}
        modes, rank_of = list(explicit), explicit
    else:
        if ranks is not None and (isinstance(ranks, bool) or not hasattr(ranks, "__index__")):
            raise TensorcutError(f"ranks must be an int or a per-mode sequence; got {ranks!r}")
        modes = list(range(N)) if modes is None else [int(m) % N for m in modes]
        rank_of = None if ranks is None else {n: ranks for n in modes}
    if len(set(modes)) != len(modes) or not modes:
        raise TensorcutError(f"modes must be distinct and non-empty; got {modes}")
    if rank_of is None and tol2 is None:  # no rule: full (exact) ranks
        rank_of = {n: _max_rank(T.shape, n) for n in modes}
    if rank_of is not None:
        rank_of = {
            n: clamp_rank(r, _max_rank(T.shape, n), name=f"rank of mode {n}")
            for n, r in rank_of.items()
        }
    return sorted(modes), rank_of, tol2


def _max_rank(shape: Sequence[int], n: int) -> int:
    """Largest useful multilinear rank of mode ``n``: ``min(n_n, prod of the other sizes)``."""
    return min(int(shape[n]), math.prod(int(s) for i, s in enumerate(shape) if i != n))


def _leading(Y: torch.Tensor, r: int) -> torch.Tensor:
    """Orthonormal basis of the leading ``r`` left singular vectors of ``Y``.

    Padded with extra orthonormal columns when ``Y`` is rank-deficient.
    """
    with small_lapack(Y):
        return torch.linalg.svd(Y, full_matrices=Y.shape[1] < r).U[:, :r]


def hosvd(
    T: torch.Tensor,
    ranks: RankSpec = None,
    *,
    eps: float | None = None,
    energy: float | None = None,
    modes: Sequence[int] | None = None,
) -> TuckerResult:
    """Truncated higher-order SVD.

    ``ranks``: an int for every decomposed mode, or one entry per mode (``None`` = leave the
    mode undecomposed). Alternatively ``eps`` (relative error bound, split per mode as in the
    module docstring) or ``energy`` (``eps = sqrt(1 - energy)``). With neither, full ranks
    (exact). ``modes`` restricts which modes are decomposed when ``ranks`` is not a sequence.
    """
    T, out_dtype = as_float(T, "T")
    if not bool(torch.isfinite(T).all()):
        raise TensorcutError("Tucker input contains NaN or Inf; clean the tensor first")
    modes, rank_of, tol2 = _resolve(T, ranks, modes, eps, energy)
    factors: list[torch.Tensor | None] = [None] * T.ndim
    for n in modes:
        Tn = _unfold(T, n)
        with small_lapack(Tn):
            U, S, _ = torch.linalg.svd(Tn, full_matrices=False)
        r = rank_of[n] if rank_of is not None else rank_from_s(S, tol2 / len(modes))  # type: ignore[operator]
        factors[n] = U[:, :r]
    core = T
    for n in modes:
        core = mode_dot(core, factors[n].mT, n)  # type: ignore[union-attr]
    res = TuckerResult(core, factors, _rel_error(T, tucker_to_tensor(core, factors)))
    return _cast(res, out_dtype)


def _cast(res: TuckerResult, dtype: torch.dtype) -> TuckerResult:
    if res.core.dtype == dtype:
        return res
    res.core = res.core.to(dtype)
    res.factors = [None if U is None else U.to(dtype) for U in res.factors]
    return res


def hooi(
    T: torch.Tensor,
    ranks: RankSpec = None,
    *,
    eps: float | None = None,
    energy: float | None = None,
    modes: Sequence[int] | None = None,
    n_iter: int = 25,
    tol: float = 1e-4,
) -> TuckerResult:
    """Higher-order orthogonal iteration (alternating least squares for Tucker), HOSVD-initialised.

    Same rank arguments as :func:`hosvd` (with ``eps``/``energy`` the ranks are fixed by the
    HOSVD rule). Sweeps until the relative error drops by less than ``tol`` or after ``n_iter``
    sweeps; the best iterate is returned, so the error is never above HOSVD's.
    """
    if n_iter < 0:
        raise TensorcutError(f"n_iter must be >= 0; got {n_iter}")
    init = hosvd(T, ranks, eps=eps, energy=energy, modes=modes)
    Tf, out_dtype = as_float(T, "T")
    dec = [n for n, U in enumerate(init.factors) if U is not None]
    factors = [None if U is None else U.to(Tf.dtype) for U in init.factors]
    norm2 = float(torch.linalg.vector_norm(Tf, dtype=torch.float64)) ** 2
    if norm2 == 0.0 or n_iter == 0 or len(dec) == 0:
        return init
    best_err, best_factors = init.rel_error, list(factors)
    prev = init.rel_error
    converged, sweeps = False, 0
    for _ in range(n_iter):
        sweeps += 1
        core = Tf
        for n in dec:
            Y = Tf
            for m in dec:
                if m != n:
                    Y = mode_dot(Y, factors[m].mT, m)  # type: ignore[union-attr]
            factors[n] = _leading(_unfold(Y, n), init.core.shape[n])
            core = mode_dot(Y, factors[n].mT, n)  # type: ignore[union-attr]
        err = math.sqrt(
            max(norm2 - float(torch.linalg.vector_norm(core, dtype=torch.float64)) ** 2, 0.0)
            / norm2
        )
        if err < best_err:
            best_err, best_factors = err, list(factors)
        if prev - err < tol:
            converged = True
            break
        prev = err
    core = Tf
    for n in dec:
        core = mode_dot(core, best_factors[n].mT, n)  # type: ignore[union-attr]
    rel = _rel_error(Tf, tucker_to_tensor(core, best_factors))
    if rel > init.rel_error:  # rounding in the norm-based estimate; HOSVD was better
        init.n_iter, init.converged = sweeps, converged
        return init
    msg = (
        ""
        if converged
        else f"HOOI stopped after {sweeps} sweeps before the error change fell below tol={tol}"
    )
    return _cast(TuckerResult(core, best_factors, rel, sweeps, converged, msg), out_dtype)


def tucker2(
    kernel: torch.Tensor,
    ranks: int | Sequence[int] | None = None,
    *,
    eps: float | None = None,
    energy: float | None = None,
    hooi: bool = True,
    n_iter: int = 25,
    tol: float = 1e-4,
) -> TuckerResult:
    """Tucker-2 of a ``(OUT, IN, KH, KW)`` kernel: decompose only the two channel modes.

    ``ranks = (r_out, r_in)`` (an int means both), or ``eps``/``energy`` (budget split over the
    two modes), or nothing for full ranks. Returns factors ``[U_out, U_in, None, None]`` and a
    core of shape ``(r_out, r_in, KH, KW)``. ``hooi=False`` stops at HOSVD.
    """
    if not isinstance(kernel, torch.Tensor) or kernel.ndim != 4:
        shape = tuple(kernel.shape) if isinstance(kernel, torch.Tensor) else type(kernel).__name__
        raise TensorcutError(f"tucker2 needs a 4-D (OUT, IN, KH, KW) kernel; got {shape}")
    if ranks is None:
        spec: RankSpec = None
    elif isinstance(ranks, Sequence):
        if len(ranks) != 2:
            raise TensorcutError(f"tucker2 ranks are (r_out, r_in); got {tuple(ranks)}")
        spec = [ranks[0], ranks[1], None, None]
    else:
        spec = [ranks, ranks, None, None]
    modes = (0, 1) if spec is None else None
    if hooi:
        return _hooi(kernel, spec, eps=eps, energy=energy, modes=modes, n_iter=n_iter, tol=tol)
    return hosvd(kernel, spec, eps=eps, energy=energy, modes=modes)


_hooi = hooi
