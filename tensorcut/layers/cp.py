"""CP (Kruskal) convolution: ``W[o, i, h, w] = sum_r L[o, r] * V[r, h] * H[r, w] * F[r, i]``.

The forward pass is four convolutions (Lebedev et al. 2015; thesis Eq. 6.4)::

    first       1x1            IN   -> R    weight F = A_in^T             (no bias)
    (padding, any padding_mode: exact after a bias-free 1x1; see base.split_padding)
    vertical    KHx1 depthwise R    -> R    weight A_kh^T, stride (sh, 1), dilation (dh, 1)
    horizontal  1xKW depthwise R    -> R    weight A_kw^T, stride (1, sw), dilation (1, dw)
    last        1x1            R    -> OUT  weight A_out * lambda         (the layer's bias)

The CP weights ``lambda`` are folded into the output factor. Grouped convolutions are
decomposed per group (rank ``R`` per group; the 1x1s run with ``groups``, the depthwise
convs over all ``g*R`` channels). Depthwise convolutions are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from tensorcut.decompose.cp import CPResult, cp_als, cp_max_rank
from tensorcut.decompose.svd import check_tolerance
from tensorcut.errors import TensorcutError
from tensorcut.geometry import (
    ConvGeometry,
    Pair,
    early_stride,
    per_group,
    split_padding,
    stage_sizes,
)
from tensorcut.layers.base import (
    FactorizedConv2d,
    MethodOptions,
    check_groups,
    clamp_ranks,
    fold_affine_,
    kernel_groups,
    make_conv,
    rank_tuple,
    register_method,
)

__all__ = ["CPConv2d", "CPOptions"]


@dataclass(frozen=True)
class CPOptions(MethodOptions):
    """CP-ALS settings (:func:`~tensorcut.decompose.cp.cp_als`); ``None`` keeps its default."""

    n_iter_max: int | None = field(default=None, metadata={"help": "ALS sweeps (default 100)"})
    tol: float | None = field(
        default=None, metadata={"help": "stop when the fit improves less than this (default 1e-7)"}
    )
    init: str | None = field(default=None, metadata={"help": '"svd" or "random" (default "svd")'})
    n_restarts: int | None = field(
        default=None, metadata={"help": "ALS restarts, best fit kept (default 1)"}
    )
    seed: int | None = field(default=None, metadata={"help": "random restarts' seed (default 0)"})
    reg: float | None = field(
        default=None, metadata={"help": "Tikhonov regularisation of each ALS solve (default 1e-6)"}
    )
    max_norm_ratio: float | None = field(
        default=None, metadata={"help": "factor-norm growth taken as divergence (default 1e4)"}
    )

    def fast(self) -> CPOptions:
        return replace(self, n_iter_max=min(self.n_iter_max or 25, 25))


@register_method
class CPConv2d(FactorizedConv2d):
    """CP convolution: 1x1 (IN->R) -> depthwise KHx1 -> depthwise 1xKW -> 1x1 (R->OUT, bias).

    ``ranks = (R,)`` per group. Parameters ``R*(IN + OUT) + g*R*(KH + KW)`` (+ OUT bias), i.e.
    the thesis' ``R(C + 2d + T)`` for square kernels.
    """

    method = "cp"
    Options = CPOptions
    fallback = "tucker2"  # when ALS does not converge

    @classmethod
    def reference_ranks(cls, geometry: ConvGeometry) -> tuple[int, ...]:
        """The rank at which CP's MACs equal the dense layer's (CP's maximal rank, the product of
        the smaller kernel sizes, is far beyond any useful one)."""
        (mx,) = cls.max_ranks(geometry)
        g = geometry.groups
        o, i = geometry.out_channels // g, geometry.in_channels // g
        kh, kw = geometry.kernel_size
        return (max(1, min(mx, o * i * kh * kw // (o + i + kh + kw))),)

    def __init__(
        self,
        geometry: ConvGeometry,
        ranks: int | Sequence[int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_groups(geometry, self.method)
        self.geometry = geometry
        (R,) = rank_tuple(ranks, 1, self.method)
        g = geometry.groups
        es = early_stride(geometry)
        (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
        kh, kw = geometry.kernel_size
        k: dict[str, Any] = {"device": device, "dtype": dtype}
        (ph, pw), self._pad_explicitly = split_padding(geometry)
        self.first = make_conv(geometry.in_channels, g * R, (1, 1), stride=es, groups=g, **k)
        self.vertical = make_conv(
            g * R,
            g * R,
            (kh, 1),
            stride=(sh // es[0], 1),
            padding=(ph, 0),
            dilation=(dh, 1),
            groups=g * R,
            **k,
        )
        self.horizontal = make_conv(
            g * R,
            g * R,
            (1, kw),
            stride=(1, sw // es[1]),
            padding=(0, pw),
            dilation=(1, dw),
            groups=g * R,
            **k,
        )
        self.last = make_conv(
            g * R, geometry.out_channels, (1, 1), groups=g, bias=geometry.bias, **k
        )
        self.rel_error: float | None = None  # set by from_conv
        self.fit_info: list[dict[str, Any]] | None = (
            None  # per-group ALS summaries, set by from_conv
        )

    @property
    def ranks(self) -> tuple[int, ...]:
        """``(R,)`` per group."""
        return (self.first.out_channels // self.geometry.groups,)

    @property
    def bias(self) -> torch.Tensor | None:
        """The output bias (held by ``last``)."""
        return self.last.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._padded(self.first(x))
        return self.last(self.horizontal(self.vertical(y)), x)

    def fold_output_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold ``y -> scale[c] * y + shift[c]`` (e.g. a following BatchNorm in evaluation mode)
        into
        the last factor, in place: its weights are scaled and it gains a bias."""
        fold_affine_(self.last, scale, shift)
        self.geometry = dataclasses.replace(self.geometry, bias=True)

    def reconstruct_weight(self) -> torch.Tensor:
        g, o, i, kh, kw = per_group(self.geometry)
        (R,) = self.ranks
        F = self.first.weight.reshape(g, R, i)
        V = self.vertical.weight.reshape(g, R, kh)
        H = self.horizontal.weight.reshape(g, R, kw)
        L = self.last.weight.reshape(g, o, R)
        return torch.einsum("gor,grh,grw,gri->goihw", L, V, H, F).reshape(g * o, i, kh, kw)

    def load_factors(self, factors: Sequence[Sequence[torch.Tensor]]) -> None:
        """Fill the weights from per-group CP factors ``(A_out * lambda, A_in, A_kh, A_kw)``, each
        ``(n, R)``.
        """
        g = self.geometry.groups
        if len(factors) != g:
            raise TensorcutError(f"need one factor set per group ({g}); got {len(factors)}")
        w = self.first.weight
        with torch.no_grad():
            self.last.weight.copy_(torch.cat([f[0] for f in factors])[:, :, None, None].to(w))
            self.first.weight.copy_(torch.cat([f[1].mT for f in factors])[:, :, None, None].to(w))
            self.vertical.weight.copy_(
                torch.cat([f[2].mT for f in factors])[:, None, :, None].to(w)
            )
            self.horizontal.weight.copy_(
                torch.cat([f[3].mT for f in factors])[:, None, None, :].to(w)
            )

    @classmethod
    def max_ranks(cls, geometry: ConvGeometry) -> tuple[int, ...]:
        """``(R_max,)``: product of the per-group kernel sizes but the largest (an exact CP always
        exists).
        """
        _, o, i, kh, kw = per_group(geometry)
        return (cp_max_rank((o, i, kh, kw)),)

    @classmethod
    def predicted_params(cls, geometry: ConvGeometry, ranks: Sequence[int]) -> int:
        g, _, _, kh, kw = per_group(geometry)
        R = int(ranks[0])
        bias = geometry.out_channels if geometry.bias else 0
        return R * (geometry.in_channels + geometry.out_channels) + g * R * (kh + kw) + bias

    @classmethod
    def predicted_macs(cls, geometry: ConvGeometry, ranks: Sequence[int], hw: Pair) -> int:
        g, _, _, kh, kw = per_group(geometry)
        R = int(ranks[0])
        (h1, w1), (_, wp), (ho, wo) = stage_sizes(geometry, hw)
        return (
            R * geometry.in_channels * h1 * w1
            + g * R * kh * ho * wp
            + g * R * kw * ho * wo
            + geometry.out_channels * R * ho * wo
        )

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        ranks: int | Sequence[int] | None = None,
        *,
        eps: float | None = None,
        energy: float | None = None,
        **opts: Any,
    ) -> CPConv2d:
        """CP-ALS of ``conv``'s kernel (per group).

        ``ranks=R`` (or ``(R,)``) is clamped to :meth:`max_ranks` with a warning; at that bound
        the CP is exact. ``eps`` / ``energy`` search the smallest rank whose ALS fit meets the
        bound (doubling, then bisection; ALS fits are not exactly monotone in the rank, so this
        is a search, not a guarantee of minimality); nothing means the exact maximal rank.
        ``opts`` go to :func:`~tensorcut.decompose.cp.cp_als` (``n_iter_max``, ``tol``, ``init``,
        ``n_restarts``, ``seed``, ``reg``, ``max_norm_ratio``). Raises
        :class:`~tensorcut.errors.ConvergenceError` when ALS fails (fall back to Tucker).
        """
        allowed = {"n_iter_max", "tol", "init", "n_restarts", "seed", "reg", "max_norm_ratio"}
        if set(opts) - allowed:
            raise TensorcutError(
                f"unknown options for cp: {sorted(set(opts) - allowed)}; use {sorted(allowed)}"
            )
        geom = ConvGeometry.from_conv(conv)
        check_groups(geom, cls.method)
        if ranks is not None and (eps is not None or energy is not None):
            raise TensorcutError("give ranks or eps/energy, not both")
        tol2 = check_tolerance(eps, energy)
        (rmax,) = cls.max_ranks(geom)
        blocks = kernel_groups(conv)
        if ranks is not None:
            (R,) = clamp_ranks(ranks, (rmax,), cls.method, ("R",))
            results = [cp_als(W, R, **opts) for W in blocks]
        elif tol2 is None:
            results = [cp_als(W, rmax, **opts) for W in blocks]
        else:
            results = [_search(W, tol2**0.5, rmax, opts) for W in blocks]
            R = max(r.rank for r in results)
            results = [
                r if r.rank == R else cp_als(W, R, **opts)
                for r, W in zip(results, blocks, strict=True)
            ]
        layer = cls(geom, results[0].rank, device=conv.weight.device, dtype=conv.weight.dtype)
        layer.load_factors([[r.factors[0] * r.weights] + r.factors[1:] for r in results])
        if conv.bias is not None:
            with torch.no_grad():
                layer.last.bias.copy_(conv.bias.detach())  # type: ignore[union-attr]
        W = torch.cat(blocks)
        norm = float(torch.linalg.vector_norm(W))
        err = float(torch.linalg.vector_norm(W - layer.reconstruct_weight().detach().to(W)))
        layer.rel_error = err / norm if norm > 0 else 0.0
        layer.fit_info = [
            {
                "rank": r.rank,
                "rel_error": r.rel_error,
                "n_iter": r.n_iter,
                "converged": r.converged,
                "message": r.message,
            }
            for r in results
        ]
        return layer


def _search(W: torch.Tensor, eps: float, rmax: int, opts: dict[str, Any]) -> CPResult:
    """Smallest rank (doubling, then bisection) whose CP-ALS fit has relative error <= ``eps``."""
    cache: dict[int, CPResult] = {}

    def fit(r: int) -> CPResult:
        if r not in cache:
            cache[r] = cp_als(W, r, **opts)
        return cache[r]

    lo, hi = 0, 1
    while hi < rmax and fit(hi).rel_error > eps:
        lo, hi = hi, min(2 * hi, rmax)
    if hi >= rmax:
        hi = rmax
        if fit(hi).rel_error > eps:
            return fit(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fit(mid).rel_error <= eps:
            hi = mid
        else:
            lo = mid
    return fit(hi)
