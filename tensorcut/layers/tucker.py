"""Tucker convolutions: Tucker-2 over the channel modes, and full Tucker with folded spatial
factors.

``W[o, i, h, w] = sum_{a, b} U_out[o, a] * C[a, b, h, w] * U_in[i, b]`` becomes three convs::

    first  1x1      IN    -> r_in    weight U_in^T      (no bias)
    (padding, any padding_mode: exact after a bias-free 1x1; see base.split_padding)
    core   KHxKW    r_in  -> r_out   weight C           (stride, dilation)
    last   1x1      r_out -> OUT     weight U_out       (the layer's bias)

Grouped convolutions are decomposed per group (block-diagonal factors): every sublayer
runs with the same ``groups`` and the ranks are per group. Depthwise is refused.
The attribute names ``first`` / ``core`` / ``last`` are a contract (the TDLRT integrator
rewrites those weights); :attr:`ranks` is read from their shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from tensorcut.decompose.tucker import hooi as _hooi
from tensorcut.decompose.tucker import hosvd, mode_dot
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

__all__ = ["FullTuckerConv2d", "TuckerConv2d", "TuckerOptions"]


@dataclass(frozen=True)
class TuckerOptions(MethodOptions):
    """Tucker settings: HOSVD, refined by HOOI unless ``hooi=False``; ``None`` keeps the default."""

    hooi: bool | None = field(
        default=None, metadata={"help": "refine the HOSVD by HOOI sweeps (default True)"}
    )
    n_iter: int | None = field(default=None, metadata={"help": "HOOI sweeps at most (default 25)"})
    tol: float | None = field(
        default=None,
        metadata={"help": "HOOI stops when the fit improves less than this (default 1e-4)"},
    )

    def fast(self) -> TuckerOptions:
        return replace(self, hooi=False)


@register_method
class TuckerConv2d(FactorizedConv2d):
    """Tucker-2 convolution: 1x1 (IN->r_in) -> KHxKW (r_in->r_out) -> 1x1 (r_out->OUT, bias).

    ``ranks = (r_out, r_in)`` per group. Parameters: ``r_in*IN + g*r_out*r_in*KH*KW + OUT*r_out``
    (+ OUT bias).
    """

    method = "tucker2"
    Options = TuckerOptions
    supports_vbmf = True
    tdlrt_trainable = True

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
        r_out, r_in = rank_tuple(ranks, 2, self.method)
        g = geometry.groups
        es = early_stride(geometry)
        stride = (geometry.stride[0] // es[0], geometry.stride[1] // es[1])
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        conv_pad, self._pad_explicitly = split_padding(geometry)
        self.first = make_conv(geometry.in_channels, g * r_in, (1, 1), stride=es, groups=g, **kw)
        self.core = make_conv(
            g * r_in,
            g * r_out,
            geometry.kernel_size,
            stride=stride,
            padding=conv_pad,
            dilation=geometry.dilation,
            groups=g,
            **kw,
        )
        self.last = make_conv(
            g * r_out, geometry.out_channels, (1, 1), groups=g, bias=geometry.bias, **kw
        )
        self.rel_error: float | None = None  # set by from_conv: ||W - W_hat|| / ||W||

    # ------------------------------------------------------------------ structure
    @property
    def ranks(self) -> tuple[int, ...]:
        """``(r_out, r_in)`` per group, read from the sublayer shapes."""
        g = self.geometry.groups
        return (self.core.out_channels // g, self.first.out_channels // g)

    @property
    def bias(self) -> torch.Tensor | None:
        """The output bias (held by ``last``)."""
        return self.last.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._padded(self.first(x))
        return self.last(self.core(y), x)

    def fold_output_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold ``y -> scale[c] * y + shift[c]`` (e.g. a following BatchNorm in evaluation mode)
        into
        the last factor, in place: its weights are scaled and it gains a bias."""
        fold_affine_(self.last, scale, shift)
        self.geometry = dataclasses.replace(self.geometry, bias=True)

    def reconstruct_weight(self) -> torch.Tensor:
        g, o, i, kh, kw = per_group(self.geometry)
        r_out, r_in = self.core.out_channels // g, self.first.out_channels // g
        F = self.first.weight.reshape(g, r_in, i)
        C = self.core.weight.reshape(g, r_out, r_in, kh, kw)
        L = self.last.weight.reshape(g, o, r_out)
        return torch.einsum("goa,gabhw,gbi->goihw", L, C, F).reshape(g * o, i, kh, kw)

    def load_factors(
        self, factors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> None:
        """Fill the weights from per-group ``(U_out (o, r_out), core (r_out, r_in, KH, KW), U_in (i,
        r_in))``.
        """
        g = self.geometry.groups
        if len(factors) != g:
            raise TensorcutError(
                f"need one (U_out, core, U_in) per group ({g}); got {len(factors)}"
            )
        w = self.first.weight
        with torch.no_grad():
            self.first.weight.copy_(
                torch.cat([U_in.mT for _, _, U_in in factors])[:, :, None, None].to(w)
            )
            self.core.weight.copy_(torch.cat([C for _, C, _ in factors]).to(w))
            self.last.weight.copy_(
                torch.cat([U_out for U_out, _, _ in factors])[:, :, None, None].to(w)
            )

    # ------------------------------------------------------------------ counts
    @classmethod
    def max_ranks(cls, geometry: ConvGeometry) -> tuple[int, ...]:
        """Largest useful ``(r_out, r_in)``: ``min(mode size, product of the other sizes)`` per
        group.
        """
        _, o, i, kh, kw = per_group(geometry)
        return (min(o, i * kh * kw), min(i, o * kh * kw))

    @classmethod
    def error_bound(
        cls,
        weight: torch.Tensor,
        geometry: ConvGeometry,
        ranks: tuple[int, ...],
        cache: dict[str, Any],
    ) -> float | None:
        """The truncated-HOSVD bound ``sqrt(tail_out(r_out)^2 + tail_in(r_in)^2) / ||W||`` from
        the two channel unfoldings' spectra (ungrouped kernels; None for grouped ones)."""
        W = weight.detach().to(torch.float64)
        if geometry.groups != 1 or len(ranks) != 2:
            return None
        norm = float(torch.linalg.vector_norm(W))
        if norm == 0:
            return 0.0
        if "out" not in cache:
            o, i = W.shape[0], W.shape[1]
            cache["out"] = torch.linalg.svdvals(W.reshape(o, -1)) ** 2
            cache["in"] = torch.linalg.svdvals(W.transpose(0, 1).reshape(i, -1)) ** 2
        tail = float(cache["out"][ranks[0] :].sum() + cache["in"][ranks[1] :].sum())
        return min(1.0, tail**0.5 / norm)

    @classmethod
    def vbmf_ranks(cls, weight: torch.Tensor) -> tuple[int, ...]:
        """``(r_out, r_in)`` by VBMF on the output- and input-mode unfoldings (Kim et al. 2016)."""
        from tensorcut.compression.rank import vbmf_tucker2_ranks

        return tuple(vbmf_tucker2_ranks(weight))

    @classmethod
    def predicted_params(cls, geometry: ConvGeometry, ranks: Sequence[int]) -> int:
        g, _, _, kh, kw = per_group(geometry)
        r_out, r_in = int(ranks[0]), int(ranks[1])
        bias = geometry.out_channels if geometry.bias else 0
        return (
            r_in * geometry.in_channels
            + g * r_out * r_in * kh * kw
            + geometry.out_channels * r_out
            + bias
        )

    @classmethod
    def predicted_macs(cls, geometry: ConvGeometry, ranks: Sequence[int], hw: Pair) -> int:
        g, _, _, kh, kw = per_group(geometry)
        r_out, r_in = int(ranks[0]), int(ranks[1])
        (h1, w1), _, (ho, wo) = stage_sizes(geometry, hw)
        return (
            r_in * geometry.in_channels * h1 * w1
            + g * r_out * r_in * kh * kw * ho * wo
            + geometry.out_channels * r_out * ho * wo
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        ranks: int | Sequence[int] | None = None,
        *,
        eps: float | None = None,
        energy: float | None = None,
        hooi: bool = True,
        n_iter: int = 25,
        tol: float = 1e-4,
        **opts: Any,
    ) -> TuckerConv2d:
        """Tucker-2 of ``conv``'s kernel (per group): explicit ``ranks=(r_out, r_in)`` (clamped to
        :meth:`max_ranks` with a warning), or ``eps`` / ``energy`` (HOSVD rule, error budget split
        over the two channel modes), or nothing for exact full ranks. ``hooi=False`` stops at HOSVD.
        """
        if opts:
            raise TensorcutError(
                f"unknown options for {cls.method}: {sorted(opts)}; use hooi, n_iter, tol"
            )
        geom = ConvGeometry.from_conv(conv)
        check_groups(geom, cls.method)
        if ranks is not None and (eps is not None or energy is not None):
            raise TensorcutError("give ranks or eps/energy, not both")
        blocks = kernel_groups(conv)
        spec = cls._rank_spec(geom, ranks)
        results = cls._decompose(blocks, spec, eps, energy, hooi, n_iter, tol)
        layer = cls(
            geom, cls._ranks_from(results), device=conv.weight.device, dtype=conv.weight.dtype
        )
        layer._load_results(results)
        layer._finish(conv, blocks)
        return layer

    @classmethod
    def _rank_spec(cls, geom: ConvGeometry, ranks: Any) -> list[int | None] | None:
        """Clamped per-mode ranks for the 4 kernel modes (None: not decomposed), or None for
        eps/full.
        """
        if ranks is None:
            return None
        r_out, r_in = clamp_ranks(ranks, cls.max_ranks(geom), cls.method, ("r_out", "r_in"))
        return [r_out, r_in, None, None]

    @classmethod
    def _modes(cls) -> tuple[int, ...]:
        return (0, 1)

    @classmethod
    def _decompose(
        cls,
        blocks: list[torch.Tensor],
        spec: list[int | None] | None,
        eps: float | None,
        energy: float | None,
        hooi: bool,
        n_iter: int,
        tol: float,
    ) -> list[Any]:
        def run(
            W: torch.Tensor, s: list[int | None] | None, e: float | None, en: float | None
        ) -> Any:
            modes = cls._modes() if s is None else None
            if s is None and e is None and en is None:  # exact: full useful ranks
                return hosvd(W, modes=modes)
            if hooi:
                return _hooi(W, s, eps=e, energy=en, modes=modes, n_iter=n_iter, tol=tol)
            return hosvd(W, s, eps=e, energy=en, modes=modes)

        results = [run(W, spec, eps, energy) for W in blocks]
        ranks = [r.ranks for r in results]
        if len(set(ranks)) > 1:  # eps picked different ranks per group: use the largest everywhere
            top = [max(r[m] for r in ranks) for m in range(4)]
            s2: list[int | None] = [top[m] if m in cls._modes() else None for m in range(4)]
            results = [run(W, s2, None, None) for W in blocks]
        return results

    @classmethod
    def _ranks_from(cls, results: list[Any]) -> tuple[int, ...]:
        return tuple(results[0].ranks[:2])

    def _load_results(self, results: list[Any]) -> None:
        self.load_factors([(r.factors[0], r.core, r.factors[1]) for r in results])

    def _finish(self, conv: nn.Conv2d, blocks: list[torch.Tensor]) -> None:
        if conv.bias is not None:
            with torch.no_grad():
                self.last.bias.copy_(conv.bias.detach())  # type: ignore[union-attr]
        W = torch.cat(blocks)
        err = torch.linalg.vector_norm(W - self.reconstruct_weight().detach().to(W))
        norm = float(torch.linalg.vector_norm(W))
        self.rel_error = float(err) / norm if norm > 0 else 0.0


@register_method
class FullTuckerConv2d(TuckerConv2d):
    """Full Tucker convolution: all four kernel modes decomposed, spatial factors folded into the
    core.

    ``ranks = (r_out, r_in, r_kh, r_kw)`` per group. The kernel is approximated by HOOI on all
    four modes; then ``core x_3 U_kh x_4 U_kw`` becomes the ``KHxKW`` middle convolution
    (Kim et al. 2016; thesis Eq. 6.6), so the layer has exactly the Tucker-2 structure and
    counts (``first`` / ``core`` / ``last``). The spatial ranks only constrain the middle kernel
    at decomposition time (a smoother, lower-rank spatial filter bank); they are kept in
    :meth:`config` so a checkpoint rebuilds the same class.
    """

    method = "tucker"
    supports_vbmf = False
    in_auto = False  # same layer structure as Tucker-2; only the decomposition differs
    tdlrt_trainable = False  # its checkpoint records spatial ranks the integrator would not keep

    def __init__(
        self,
        geometry: ConvGeometry,
        ranks: int | Sequence[int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        r = rank_tuple(ranks, 4, self.method)
        super().__init__(geometry, r[:2], device=device, dtype=dtype)
        self._spatial = (r[2], r[3])

    @property
    def ranks(self) -> tuple[int, ...]:
        """``(r_out, r_in, r_kh, r_kw)`` per group."""
        return super().ranks + self._spatial

    @classmethod
    def max_ranks(cls, geometry: ConvGeometry) -> tuple[int, ...]:
        _, o, i, kh, kw = per_group(geometry)
        return (min(o, i * kh * kw), min(i, o * kh * kw), min(kh, o * i * kw), min(kw, o * i * kh))

    @classmethod
    def _rank_spec(cls, geom: ConvGeometry, ranks: Any) -> list[int | None] | None:
        if ranks is None:
            return None
        return list(
            clamp_ranks(ranks, cls.max_ranks(geom), cls.method, ("r_out", "r_in", "r_kh", "r_kw"))
        )

    @classmethod
    def _modes(cls) -> tuple[int, ...]:
        return (0, 1, 2, 3)

    @classmethod
    def _ranks_from(cls, results: list[Any]) -> tuple[int, ...]:
        return tuple(results[0].ranks)

    def _load_results(self, results: list[Any]) -> None:
        folded = []
        for r in results:
            C = mode_dot(mode_dot(r.core, r.factors[2], 2), r.factors[3], 3)
            folded.append((r.factors[0], C, r.factors[1]))
        self.load_factors(folded)
