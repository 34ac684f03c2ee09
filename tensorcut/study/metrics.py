"""Metrics of one kernel truncation: norm loss, relative error, entropy, correlation loss, CR.

Definitions (``shared/DESIGN.md``): norm loss % = 100 (|K|^2 - |K~|^2) / |K|^2 with the
squared Frobenius norm; relative error = |K - K~|_F / |K|_F; correlation loss % =
100 (E(M) - E(M~)) / E(M) with M~'s spectrum renormalised (0 when E(M) = 0, since a
product kernel has no correlation to lose); compression ratio = dense parameters /
parameters of the truncated factorization.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tensorcut.errors import TensorcutError
from tensorcut.tenalg import (
    BipartitionSVD,
    canonical_bipartition,
    cp_params,
    entropy,
    numerical_rank_tol,
    spectrum,
    svd_factor_params,
    tucker_params,
    unfold_shape,
)


@dataclass(frozen=True)
class TruncationMetrics:
    """Everything measured about one truncated kernel (no accuracy; that comes from a sweep)."""

    norm_loss_pct: float
    rel_error: float
    entropy_before: float
    entropy_after: float
    corr_loss_pct: float
    compression_ratio: float
    dense_params: int
    factor_params: int
    entropy_form: str
    entropy_bipartition: str

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for storage."""
        return asdict(self)


def corr_loss_pct(before: float, after: float) -> float:
    """100 (E - E~) / E; 0 for a kernel without correlations (E = 0)."""
    return 0.0 if before <= 0.0 else 100.0 * (before - after) / before


def svd_metrics(svd: BipartitionSVD, keep: int, *, entropy_form: str = "vn") -> TruncationMetrics:
    """Metrics of keeping ``keep`` singular values, computed from the spectrum alone."""
    keep = svd.check_keep(keep)
    S2 = svd.S * svd.S
    total = float(S2.sum())
    discarded = float(S2[keep:].sum())
    frac = 0.0 if total == 0.0 else discarded / total
    tol = svd.rank_tol
    e0 = entropy(svd.S, entropy_form, tol=tol)
    e1 = entropy(svd.S[:keep], entropy_form, tol=tol)
    dense = math.prod(svd.shape)
    fparams = svd_factor_params(svd.shape, svd.bipartition, keep)
    return TruncationMetrics(
        norm_loss_pct=100.0 * frac,
        rel_error=math.sqrt(frac),
        entropy_before=e0,
        entropy_after=e1,
        corr_loss_pct=corr_loss_pct(e0, e1),
        compression_ratio=dense / fparams,
        dense_params=dense,
        factor_params=fparams,
        entropy_form=entropy_form,
        entropy_bipartition=svd.bipartition,
    )


def reconstruction_metrics(
    K: torch.Tensor,
    K_tilde: torch.Tensor,
    factor_params: int,
    *,
    entropy_form: str = "vn",
    entropy_bipartition: str = "OUT",
) -> TruncationMetrics:
    """Metrics of an arbitrary approximation ``K~`` of ``K`` (CP, Tucker), measured directly.

    Entropy is taken along ``entropy_bipartition`` of both kernels. Norm loss can be
    negative when an approximation has more norm than the original (it is reported as is).
    """
    if tuple(K.shape) != tuple(K_tilde.shape):
        raise TensorcutError(
            f"approximation shape {tuple(K_tilde.shape)} differs from kernel {tuple(K.shape)}"
        )
    bip = canonical_bipartition(entropy_bipartition)
    k64 = K.detach().to(device="cpu", dtype=torch.float64)
    t64 = K_tilde.detach().to(device="cpu", dtype=torch.float64)
    n0 = float((k64 * k64).sum())
    n1 = float((t64 * t64).sum())
    err = float(torch.linalg.vector_norm(k64 - t64))
    s0, s1 = spectrum(k64, bip), spectrum(t64, bip)
    shape_uf = unfold_shape(K.shape, bip)
    e0 = entropy(s0, entropy_form, tol=numerical_rank_tol(s0, shape_uf, K.dtype))
    e1 = entropy(s1, entropy_form, tol=numerical_rank_tol(s1, shape_uf, K_tilde.dtype))
    dense = math.prod(int(s) for s in K.shape)
    return TruncationMetrics(
        norm_loss_pct=0.0 if n0 == 0.0 else 100.0 * (n0 - n1) / n0,
        rel_error=0.0 if n0 == 0.0 else err / math.sqrt(n0),
        entropy_before=e0,
        entropy_after=e1,
        corr_loss_pct=corr_loss_pct(e0, e1),
        compression_ratio=dense / factor_params,
        dense_params=dense,
        factor_params=factor_params,
        entropy_form=entropy_form,
        entropy_bipartition=bip,
    )


@dataclass
class CPTruncation:
    """A CP-truncated kernel with the solver's report."""

    kernel: torch.Tensor
    rank: int
    rel_error: float
    n_iter: int
    converged: bool
    message: str


def cp_truncate(
    K: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-7,
    n_restarts: int = 1,
    seed: int = 0,
) -> CPTruncation:
    """Kernel reconstituted from a rank-``rank`` CP decomposition (the project's CP-ALS)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise TensorcutError(f"CP rank must be a positive integer, got {rank!r}")
    from tensorcut.decompose.cp import cp_als, cp_to_tensor

    T = K.detach().to(device="cpu", dtype=torch.float64)
    res = cp_als(
        T, rank, n_iter_max=n_iter_max, tol=tol, init="svd", n_restarts=n_restarts, seed=seed
    )
    rebuilt = cp_to_tensor(res.weights, res.factors).to(dtype=K.dtype, device=K.device)
    return CPTruncation(
        rebuilt, rank, float(res.rel_error), int(res.n_iter), bool(res.converged), str(res.message)
    )


def cp_metrics(
    K: torch.Tensor, cp: CPTruncation, *, entropy_form: str = "vn", entropy_bipartition: str = "OUT"
) -> TruncationMetrics:
    """Metrics of a CP truncation; CR counts ``rank * (OUT + IN + KH + KW)`` parameters."""
    return reconstruction_metrics(
        K,
        cp.kernel,
        cp_params(K.shape, cp.rank),
        entropy_form=entropy_form,
        entropy_bipartition=entropy_bipartition,
    )


def tucker_metrics(
    K: torch.Tensor,
    K_tilde: torch.Tensor,
    ranks: Sequence[int],
    *,
    entropy_form: str = "vn",
    entropy_bipartition: str = "OUT",
) -> TruncationMetrics:
    """Metrics of a Tucker truncation; CR counts core plus factor parameters."""
    return reconstruction_metrics(
        K,
        K_tilde,
        tucker_params(K.shape, ranks),
        entropy_form=entropy_form,
        entropy_bipartition=entropy_bipartition,
    )


__all__ = [
    "TruncationMetrics",
    "corr_loss_pct",
    "svd_metrics",
    "reconstruction_metrics",
    "CPTruncation",
    "cp_truncate",
    "cp_metrics",
    "tucker_metrics",
    "mean_metrics",
]


def mean_metrics(per_layer: Mapping[str, TruncationMetrics], entropy_form: str) -> dict[str, Any]:
    """Average norm loss (as the paper reports for all-layer truncation) and the conv-only CR."""
    ms = list(per_layer.values())
    dense = sum(m.dense_params for m in ms)
    fact = sum(m.factor_params for m in ms)
    return {
        "norm_loss_pct": sum(m.norm_loss_pct for m in ms) / len(ms),
        "rel_error": sum(m.rel_error for m in ms) / len(ms),
        "entropy_before": sum(m.entropy_before for m in ms) / len(ms),
        "entropy_after": sum(m.entropy_after for m in ms) / len(ms),
        "corr_loss_pct": sum(m.corr_loss_pct for m in ms) / len(ms),
        "compression_ratio": dense / fact,
        "entropy_form": entropy_form,
    }
