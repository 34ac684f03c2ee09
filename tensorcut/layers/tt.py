"""Tensor-train convolution, mode order IN, KH, KW, OUT.

The kernel, permuted to ``(IN, KH, KW, OUT)``, is a TT with cores ``G1 (1, IN, r1)``,
``G2 (r1, KH, r2)``, ``G3 (r2, KW, r3)``, ``G4 (r3, OUT, 1)``::

    W[o, i, h, w] = sum_{a, b, c} G1[0, i, a] G2[a, h, b] G3[b, w, c] G4[c, o, 0]

so the forward pass is four plain convolutions, each contracting one core::

    first       1x1   IN -> r1    weight[a, i, 0, 0] = G1[0, i, a]     (no bias)
    (padding, any padding_mode: exact after a bias-free 1x1; see base.split_padding)
    vertical    KHx1  r1 -> r2    weight[b, a, h, 0] = G2[a, h, b], stride (sh, 1), dilation (dh, 1)
    horizontal  1xKW  r2 -> r3    weight[c, b, 0, w] = G3[b, w, c], stride (1, sw), dilation (1, dw)
    last        1x1   r3 -> OUT   weight[o, c, 0, 0] = G4[c, o, 0]     (the layer's bias)

Grouped convolutions: one TT per group (ranks per group, every sublayer runs with
``groups``; groups whose ``eps`` ranks came out smaller are zero-padded, which is exact).
Depthwise convolutions are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tensorcut.decompose.tt import tt_max_ranks, tt_svd
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
    check_groups,
    clamp_ranks,
    fold_affine_,
    kernel_groups,
    make_conv,
    rank_tuple,
    register_method,
)

__all__ = ["TTConv2d"]


def _pad_cores(cores: list[torch.Tensor], ranks: Sequence[int]) -> list[torch.Tensor]:
    """Zero-pad TT cores to larger internal ranks (the represented tensor is unchanged)."""
    full = [1, *ranks, 1]
    out = []
    for k, G in enumerate(cores):
        P = G.new_zeros(full[k], G.shape[1], full[k + 1])
        P[: G.shape[0], :, : G.shape[2]] = G
        out.append(P)
    return out


@register_method
class TTConv2d(FactorizedConv2d):
    """TT convolution: 1x1 (IN->r1) -> KHx1 (r1->r2) -> 1xKW (r2->r3) -> 1x1 (r3->OUT, bias).

    ``ranks = (r1, r2, r3)`` per group. Parameters
    ``r1*IN + g*r1*r2*KH + g*r2*r3*KW + r3*OUT`` (+ OUT bias).
    """

    method = "tt"

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
        r1, r2, r3 = rank_tuple(ranks, 3, self.method)
        g = geometry.groups
        es = early_stride(geometry)
        (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
        kh, kw = geometry.kernel_size
        k: dict[str, Any] = {"device": device, "dtype": dtype}
        (ph, pw), self._pad_explicitly = split_padding(geometry)
        self.first = make_conv(geometry.in_channels, g * r1, (1, 1), stride=es, groups=g, **k)
        self.vertical = make_conv(
            g * r1,
            g * r2,
            (kh, 1),
            stride=(sh // es[0], 1),
            padding=(ph, 0),
            dilation=(dh, 1),
            groups=g,
            **k,
        )
        self.horizontal = make_conv(
            g * r2,
            g * r3,
            (1, kw),
            stride=(1, sw // es[1]),
            padding=(0, pw),
            dilation=(1, dw),
            groups=g,
            **k,
        )
        self.last = make_conv(
            g * r3, geometry.out_channels, (1, 1), groups=g, bias=geometry.bias, **k
        )
        self.rel_error: float | None = None  # set by from_conv

    @property
    def ranks(self) -> tuple[int, ...]:
        """``(r1, r2, r3)`` per group."""
        g = self.geometry.groups
        return (
            self.first.out_channels // g,
            self.vertical.out_channels // g,
            self.horizontal.out_channels // g,
        )

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

    def cores(self) -> list[list[torch.Tensor]]:
        """Per-group TT cores ``[G1 (1, IN/g, r1), G2, G3, G4 (r3, OUT/g, 1)]`` read from the
        weights.
        """
        g, o, i, kh, kw = per_group(self.geometry)
        r1, r2, r3 = self.ranks
        F = self.first.weight.reshape(g, r1, i)
        V = self.vertical.weight.reshape(g, r2, r1, kh)
        H = self.horizontal.weight.reshape(g, r3, r2, kw)
        L = self.last.weight.reshape(g, o, r3)
        return [
            [F[k].mT[None], V[k].permute(1, 2, 0), H[k].permute(1, 2, 0), L[k].mT[:, :, None]]
            for k in range(g)
        ]

    def reconstruct_weight(self) -> torch.Tensor:
        g, o, i, kh, kw = per_group(self.geometry)
        r1, r2, r3 = self.ranks
        F = self.first.weight.reshape(g, r1, i)
        V = self.vertical.weight.reshape(g, r2, r1, kh)
        H = self.horizontal.weight.reshape(g, r3, r2, kw)
        L = self.last.weight.reshape(g, o, r3)
        return torch.einsum("goc,gcbw,gbah,gai->goihw", L, H, V, F).reshape(g * o, i, kh, kw)

    def load_cores(self, cores: Sequence[Sequence[torch.Tensor]]) -> None:
        """Fill the weights from per-group cores ``[G1, G2, G3, G4]`` (IN, KH, KW, OUT order)."""
        g = self.geometry.groups
        if len(cores) != g:
            raise TensorcutError(f"need one core list per group ({g}); got {len(cores)}")
        w = self.first.weight
        with torch.no_grad():
            self.first.weight.copy_(torch.cat([c[0][0].mT for c in cores])[:, :, None, None].to(w))
            self.vertical.weight.copy_(
                torch.cat([c[1].permute(2, 0, 1) for c in cores])[..., None].to(w)
            )
            self.horizontal.weight.copy_(
                torch.cat([c[2].permute(2, 0, 1) for c in cores])[:, :, None, :].to(w)
            )
            self.last.weight.copy_(
                torch.cat([c[3][:, :, 0].mT for c in cores])[:, :, None, None].to(w)
            )

    @classmethod
    def max_ranks(cls, geometry: ConvGeometry) -> tuple[int, ...]:
        """Largest useful TT ranks of the per-group ``(IN/g, KH, KW, OUT/g)`` tensor."""
        _, o, i, kh, kw = per_group(geometry)
        return tt_max_ranks((i, kh, kw, o))

    @classmethod
    def predicted_params(cls, geometry: ConvGeometry, ranks: Sequence[int]) -> int:
        g, _, _, kh, kw = per_group(geometry)
        r1, r2, r3 = (int(r) for r in ranks)
        bias = geometry.out_channels if geometry.bias else 0
        return (
            r1 * geometry.in_channels
            + g * r1 * r2 * kh
            + g * r2 * r3 * kw
            + r3 * geometry.out_channels
            + bias
        )

    @classmethod
    def predicted_macs(cls, geometry: ConvGeometry, ranks: Sequence[int], hw: Pair) -> int:
        g, _, _, kh, kw = per_group(geometry)
        r1, r2, r3 = (int(r) for r in ranks)
        (h1, w1), (_, wp), (ho, wo) = stage_sizes(geometry, hw)
        return (
            r1 * geometry.in_channels * h1 * w1
            + g * r1 * r2 * kh * ho * wp
            + g * r2 * r3 * kw * ho * wo
            + geometry.out_channels * r3 * ho * wo
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
    ) -> TTConv2d:
        """TT-SVD of ``conv``'s kernel in mode order (IN, KH, KW, OUT), per group.

        ``ranks=(r1, r2, r3)`` (an int means all) are clamped to :meth:`max_ranks` with a
        warning; ``eps`` bounds the relative error (``eps / sqrt(3)`` per TT-SVD step);
        ``energy`` means ``eps = sqrt(1 - energy)``; nothing means exact full ranks.
        """
        if opts:
            raise TensorcutError(
                f"unknown options for tt: {sorted(opts)}; TT-SVD takes ranks, eps or energy"
            )
        geom = ConvGeometry.from_conv(conv)
        check_groups(geom, cls.method)
        if ranks is not None and (eps is not None or energy is not None):
            raise TensorcutError("give ranks or eps/energy, not both")
        maxr = cls.max_ranks(geom)
        req = None if ranks is None else clamp_ranks(ranks, maxr, cls.method, ("r1", "r2", "r3"))
        blocks = kernel_groups(conv)
        cores = [tt_svd(W.permute(1, 2, 3, 0), req, eps=eps, energy=energy) for W in blocks]
        top = [max(c[k].shape[2] for c in cores) for k in range(3)]
        cores = [_pad_cores(c, top) for c in cores]
        layer = cls(geom, tuple(top), device=conv.weight.device, dtype=conv.weight.dtype)
        layer.load_cores(cores)
        if conv.bias is not None:
            with torch.no_grad():
                layer.last.bias.copy_(conv.bias.detach())  # type: ignore[union-attr]
        W = torch.cat(blocks)
        norm = float(torch.linalg.vector_norm(W))
        err = float(torch.linalg.vector_norm(W - layer.reconstruct_weight().detach().to(W)))
        layer.rel_error = err / norm if norm > 0 else 0.0
        return layer
