"""Convolution-kernel modes, bipartitions, unfold / fold, spectra, SVD and Tucker truncation.

A Conv2d weight is a four-mode tensor ``(OUT, IN, KH, KW)``. A *bipartition* splits
the modes into two groups; it is named by the modes on one side, in kernel order
(``OUT``, ``IN``, ``KH``, ``KW``, ``OUT-IN``, ``OUT-KH``, ``OUT-KW``). Unfolding puts the
named modes on the rows and the others on the columns, both in kernel order.

Definitions follow ``shared/DESIGN.md``: the *norm* is the squared Frobenius norm
(the sum of squared singular values); norm loss is the discarded share of it;
the entanglement entropy is ``-sum p ln p`` with ``p = S^2 / sum S^2`` (``form="vn"``),
or the paper's literal Eq. 14, ``-sum s ln s`` with ``s = S / sqrt(sum S^2)``
(``form="literal"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tensorcut.errors import TensorcutError

MODES: tuple[str, ...] = ("OUT", "IN", "KH", "KW")
BIPARTITIONS: tuple[str, ...] = ("OUT", "IN", "KH", "KW", "OUT-IN", "OUT-KH", "OUT-KW")
SINGLE_MODE: tuple[str, ...] = BIPARTITIONS[:4]
TWO_MODE: tuple[str, ...] = BIPARTITIONS[4:]
ENTROPY_FORMS: tuple[str, ...] = ("vn", "literal")
ENTROPY_LABELS: dict[str, str] = {
    "vn": "E = -sum p ln p, p = S^2/sum S^2 (von Neumann)",
    "literal": "E = -sum s ln s, s = S/sqrt(sum S^2) (paper Eq. 14 as printed)",
}

_MODE_INDEX = {m: i for i, m in enumerate(MODES)}


def _canonical_sides() -> dict[frozenset[int], str]:
    """Map every side of every bipartition (and its complement) to the canonical name."""
    table: dict[frozenset[int], str] = {}
    for name in BIPARTITIONS:
        side = frozenset(_MODE_INDEX[m] for m in name.split("-"))
        table[side] = name
        table[frozenset(range(4)) - side] = name
    return table


_SIDES = _canonical_sides()


def canonical_bipartition(name: str) -> str:
    """Return the canonical name of a bipartition, accepting ``-``/``,``/``+`` separators,
    any case and the complementary side (``IN-KW`` is the same cut as ``OUT-KH``).

    Raises ``TensorcutError`` listing the valid names for anything else.
    """
    if not isinstance(name, str):
        raise TensorcutError(
            f"bipartition must be a string, got {name!r}; valid: {', '.join(BIPARTITIONS)}"
        )
    parts = [
        p for p in name.replace(",", "-").replace("+", "-").replace(" ", "").upper().split("-") if p
    ]
    try:
        side = frozenset(_MODE_INDEX[p] for p in parts)
    except KeyError:
        side = frozenset()
    if len(parts) != len(side) or side not in _SIDES:
        raise TensorcutError(f"unknown bipartition {name!r}; valid: {', '.join(BIPARTITIONS)}")
    return _SIDES[side]


def bipartition_modes(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(row modes, column modes) of a bipartition, as kernel axis indices in kernel order."""
    canon = canonical_bipartition(name)
    rows = tuple(_MODE_INDEX[m] for m in canon.split("-"))
    cols = tuple(i for i in range(4) if i not in rows)
    return rows, cols


def _check_kernel(K: torch.Tensor) -> None:
    if not isinstance(K, torch.Tensor) or K.dim() != 4:
        shape = tuple(K.shape) if isinstance(K, torch.Tensor) else type(K).__name__
        raise TensorcutError(f"expected a 4-mode conv kernel (OUT, IN, KH, KW), got {shape}")


def unfold_shape(shape: Sequence[int], bipartition: str) -> tuple[int, int]:
    """(rows, columns) of the unfolding of a kernel of this shape."""
    rows, cols = bipartition_modes(bipartition)
    return math.prod(shape[i] for i in rows), math.prod(shape[i] for i in cols)


def n_singular(shape: Sequence[int], bipartition: str) -> int:
    """Number of singular values ``n = min(rows, cols)`` of the unfolding."""
    return min(unfold_shape(shape, bipartition))


def unfold(K: torch.Tensor, bipartition: str) -> torch.Tensor:
    """The matrix ``M`` with the named modes as rows and the others as columns."""
    _check_kernel(K)
    rows, cols = bipartition_modes(bipartition)
    r, c = unfold_shape(K.shape, bipartition)
    return K.permute(*rows, *cols).reshape(r, c)


def fold(M: torch.Tensor, bipartition: str, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`unfold`: reshape ``M`` back to a kernel of ``shape``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise TensorcutError(f"kernel shape must have 4 modes (OUT, IN, KH, KW), got {shape}")
    rows, cols = bipartition_modes(bipartition)
    expect = unfold_shape(shape, bipartition)
    if tuple(M.shape) != expect:
        raise TensorcutError(
            f"matrix of shape {tuple(M.shape)} cannot fold to {shape} along "
            f"{canonical_bipartition(bipartition)}; expected {expect}"
        )
    order = rows + cols
    T = M.reshape(*(shape[i] for i in order))
    inverse = [order.index(i) for i in range(4)]
    return T.permute(*inverse).contiguous()


def numerical_rank_tol(
    S: torch.Tensor, shape: Sequence[int], dtype: torch.dtype | None = None
) -> float:
    """Singular values at or below this are treated as exact zeros (LAPACK-style rank rule
    ``S_max * max(rows, cols) * eps``, with ``eps`` of the kernel's own ``dtype``)."""
    if S.numel() == 0:
        return 0.0
    return float(S.max()) * max(shape) * float(torch.finfo(dtype or S.dtype).eps)


def entropy(S: torch.Tensor | Sequence[float], form: str = "vn", *, tol: float = 0.0) -> float:
    """Entanglement entropy of a singular spectrum (natural log).

    ``form="vn"``: ``-sum p ln p`` with ``p = S^2 / sum S^2`` (von Neumann, DESIGN default).
    ``form="literal"``: the paper's printed Eq. 14, ``-sum s ln s`` with ``s = S / sqrt(sum S^2)``.
    Values ``<= tol`` count as zero, so a product (rank-1) kernel has entropy exactly 0.
    """
    if form not in ENTROPY_FORMS:
        raise TensorcutError(f"unknown entropy form {form!r}; valid: {', '.join(ENTROPY_FORMS)}")
    s = torch.as_tensor(S, dtype=torch.float64).flatten()
    s = s[s > tol]
    if s.numel() <= 1:
        return 0.0
    total = float((s * s).sum())
    if total == 0.0:
        return 0.0
    if form == "vn":
        p = (s * s) / total
        value = -float((p * torch.log(p)).sum())
    else:
        q = s / math.sqrt(total)
        value = -float((q * torch.log(q)).sum())
    return max(0.0, value)


@dataclass
class BipartitionSVD:
    """The SVD of one unfolding, computed once and reused for every keep value.

    ``U @ diag(S) @ Vh`` is the float64 unfolding; ``kernel`` is the original tensor,
    returned unchanged for ``keep == n`` so that no truncation is an exact no-op.
    """

    bipartition: str
    shape: tuple[int, int, int, int]
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    kernel: torch.Tensor

    @property
    def n(self) -> int:
        """Number of singular values."""
        return int(self.S.numel())

    @property
    def rank_tol(self) -> float:
        """Threshold below which singular values are exact zeros for the entropy."""
        return numerical_rank_tol(
            self.S, unfold_shape(self.shape, self.bipartition), self.kernel.dtype
        )

    def check_keep(self, keep: int, *, layer: str | None = None) -> int:
        """Validate ``1 <= keep <= n``; the error names the valid range."""
        where = f" for layer {layer!r}" if layer else ""
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise TensorcutError(f"keep must be an integer, got {keep!r}")
        if not 1 <= keep <= self.n:
            raise TensorcutError(
                f"keep={keep} out of range{where} along {self.bipartition} "
                f"(kernel {tuple(self.shape)}): valid 1..{self.n}"
            )
        return keep

    def truncate(self, keep: int, *, layer: str | None = None) -> torch.Tensor:
        """Kernel rebuilt from the ``keep`` largest singular triplets, in the kernel's dtype."""
        keep = self.check_keep(keep, layer=layer)
        if keep == self.n:
            return self.kernel.clone()
        M = (self.U[:, :keep] * self.S[:keep]) @ self.Vh[:keep]
        return fold(M, self.bipartition, self.shape).to(
            dtype=self.kernel.dtype, device=self.kernel.device
        )


def svd_bipartition(K: torch.Tensor, bipartition: str) -> BipartitionSVD:
    """SVD (float64, on CPU) of the unfolding of ``K`` along ``bipartition``."""
    _check_kernel(K)
    canon = canonical_bipartition(bipartition)
    M = unfold(K.detach().to(device="cpu", dtype=torch.float64), canon)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    o, i, kh, kw = (int(s) for s in K.shape)  # 4-D: checked above
    return BipartitionSVD(canon, (o, i, kh, kw), U, S, Vh, K.detach().clone())


def spectrum(K: torch.Tensor, bipartition: str) -> torch.Tensor:
    """Singular values (float64, descending) of the unfolding along ``bipartition``."""
    _check_kernel(K)
    M = unfold(K.detach().to(device="cpu", dtype=torch.float64), bipartition)
    return torch.linalg.svdvals(M)


def truncate(K: torch.Tensor, bipartition: str, keep: int) -> torch.Tensor:
    """Kernel with only the ``keep`` largest singular values of its unfolding kept."""
    return svd_bipartition(K, bipartition).truncate(keep)


def svd_factor_params(shape: Sequence[int], bipartition: str, keep: int) -> int:
    """Parameters of the two truncated SVD factors: ``keep * (rows + cols)``."""
    r, c = unfold_shape(shape, bipartition)
    return keep * (r + c)


def cp_params(shape: Sequence[int], rank: int) -> int:
    """Parameters of a rank-``rank`` CP kernel: ``rank * (OUT + IN + KH + KW)``."""
    return rank * sum(int(s) for s in shape)


def tucker_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Core plus factor parameters of a Tucker kernel."""
    return math.prod(ranks) + sum(int(n) * int(r) for n, r in zip(shape, ranks, strict=True))


def _check_tucker_ranks(shape: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
    ranks = tuple(int(r) for r in ranks)
    if len(ranks) != 4:
        raise TensorcutError(f"Tucker ranks need one value per mode (OUT, IN, KH, KW), got {ranks}")
    for mode, n, r in zip(MODES, shape, ranks, strict=True):
        if not 1 <= r <= n:
            raise TensorcutError(f"Tucker rank {r} for mode {mode} out of range: valid 1..{n}")
    return ranks


def tucker_truncate(K: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """Kernel rebuilt from a truncated HOSVD with the given (OUT, IN, KH, KW) ranks."""
    _check_kernel(K)
    ranks = _check_tucker_ranks(K.shape, ranks)
    if ranks == tuple(K.shape):
        return K.detach().clone()
    from tensorcut.decompose.tucker import hosvd, tucker_to_tensor

    res = hosvd(K.detach().to(dtype=torch.float64), ranks)
    return tucker_to_tensor(res.core, res.factors).to(dtype=K.dtype)


__all__ = [
    "MODES",
    "BIPARTITIONS",
    "SINGLE_MODE",
    "TWO_MODE",
    "ENTROPY_FORMS",
    "ENTROPY_LABELS",
    "canonical_bipartition",
    "bipartition_modes",
    "unfold_shape",
    "n_singular",
    "unfold",
    "fold",
    "numerical_rank_tol",
    "entropy",
    "BipartitionSVD",
    "svd_bipartition",
    "spectrum",
    "truncate",
    "svd_factor_params",
    "cp_params",
    "tucker_params",
    "tucker_truncate",
]
