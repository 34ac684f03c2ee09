"""Shared machinery for factorized convolutions: the method contract, counting, the registry.

The convolution geometry (padding, strides, output sizes) lives in :mod:`tensorcut.geometry`.

Every factorized layer is a plain sequence of small convolutions built once at
construction. Padding is exact anywhere after the bias-free leading 1x1 contraction:
zero padding that is symmetric per axis is done by the spatial convolutions themselves
(no copy); other modes and asymmetric padding are applied explicitly (``F.pad``) before
the first spatial convolution, which then runs unpadded (see :func:`split_padding`).

Speed (CPU): the 1x1 convolutions are :class:`PointwiseConv2d`, which run as one GEMM
and write their output in the memory layout the next convolution is fastest in: the
internal activations are channels-last, and the layer's output takes the memory format
of its input, as ``nn.Conv2d``'s does. The arithmetic is that of ``nn.Conv2d``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Union, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.geometry import (
    ConvGeometry,
    Pair,
    explicit_pad,
)
from tensorcut.layers._registry import LAYER_REGISTRY, register_method

__all__ = [
    "LAYER_REGISTRY",
    "ConvGeometry",
    "FactorizedConv2d",
    "MethodOptions",
    "register_method",
]

#: a tensor to match, a memory format, or None
Layout = Union[torch.Tensor, torch.memory_format, None]  # noqa: UP007 (a runtime alias)


def _pointwise(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Pair,
    groups: int,
    like: Layout,
) -> torch.Tensor:
    """Unpadded 1x1 convolution of a 4-D ``x`` (groups 1) as one GEMM; other calls use ``F.conv2d``.

    The output's memory layout: channels-last when ``like`` is None; ``like`` itself when it
    is a ``torch.memory_format``; else ``like``'s memory format (channels-last or contiguous).
    GEMM operands are views of ``x`` whenever ``x`` is contiguous in either format; otherwise
    ``x`` is copied once.
    """
    if groups != 1 or x.dim() != 4:
        return F.conv2d(x, weight, bias, stride, 0, 1, groups)
    if stride != (1, 1):
        x = x[:, :, :: stride[0], :: stride[1]]
    n, c, h, w = x.shape
    o = weight.shape[0]
    W = weight.reshape(o, c)
    if like is None:
        cl_out = True
    elif isinstance(like, torch.memory_format):
        cl_out = like == torch.channels_last
    else:
        cl_out = (
            like.dim() == 4
            and not like.is_contiguous()
            and like.is_contiguous(memory_format=torch.channels_last)
        )
    if x.is_contiguous():
        rows = x.reshape(n, c, h * w).transpose(1, 2)  # (n, hw, c), a view
    else:
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view
    # bmm takes the strided operands as they are (matmul would copy a transposed batch operand).
    # The bias is added in place after the GEMM: addmm/baddbmm first broadcast-copy it into the
    # whole output and have the GEMM read it back, a pass that cost as much as the GEMM itself
    # for thin factors with wide outputs (16 -> 64 channels at 56x56, batch 32: 3.4 vs 2.7 ms)
    if cl_out:
        if rows.is_contiguous():  # channels-last in: one (n*hw, c) x (c, o) GEMM
            y = rows.reshape(n * h * w, c) @ W.t()
            if bias is not None:
                y = y.add_(bias)
        else:
            y = torch.bmm(rows, W.t().expand(n, c, o))
            if bias is not None:
                y = y.add_(bias.view(1, 1, o))
        return y.reshape(n, h, w, o).permute(0, 3, 1, 2)
    y = torch.bmm(W.expand(n, o, c), rows.transpose(1, 2))  # (n, o, c) x (n, c, hw)
    if bias is not None:
        y = y.add_(bias.view(1, o, 1))
    return y.reshape(n, o, h, w)


torch.fx.wrap("_pointwise")  # layout decisions read tensor properties: keep them out of fx graphs


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` that runs as a GEMM and chooses its output memory layout.

    ``forward(x, like=None)``: the output is channels-last in memory (the layout the next
    spatial convolution of a factorized layer is fastest in) or, given ``like`` (a tensor or a
    ``torch.memory_format``), in ``like``'s memory format. On CPU a contiguous (NCHW) 1x1
    ``nn.Conv2d`` over a few channels is
    several times slower than the same GEMM. Same parameters and state-dict keys as
    ``nn.Conv2d``; strided, grouped or non-4-D calls fall back to it.
    """

    def forward(self, x: torch.Tensor, like: Layout = None) -> torch.Tensor:
        if self.padding != (0, 0) or self.padding_mode != "zeros":
            return super().forward(x)
        return _pointwise(x, self.weight, self.bias, self.stride, self.groups, like)  # type: ignore[arg-type]


def make_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: Pair,
    *,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
    bias: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Conv2d:
    """A sublayer convolution (zero-padded by ``padding``) with zeroed parameters; 1x1 kernels
    are :class:`PointwiseConv2d`.

    Factorized layers are filled by ``from_conv`` or a checkpoint; zeros rather than random or
    uninitialised memory make a forgotten fill visible instead of silently noisy.
    """
    cls = (
        PointwiseConv2d if tuple(kernel_size) == (1, 1) and tuple(padding) == (0, 0) else nn.Conv2d
    )
    conv = nn.utils.skip_init(  # skip_init needs a real device (None would leave it on "meta")
        cls,
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        device="cpu" if device is None else device,
        dtype=dtype,
    )
    with torch.no_grad():
        for p in conv.parameters():
            p.zero_()
    return conv


def check_groups(geom: ConvGeometry, method: str, *, grouped: bool = True) -> None:
    """Refuse depthwise convolutions (always) and grouped ones when ``grouped`` is False."""
    g = geom.groups
    if g > 1 and g == geom.in_channels:
        raise TensorcutError(
            f"depthwise convolution (groups == in_channels == {g}) not supported by {method}: "
            "each filter sees one channel, so there is nothing to factorize; leave the layer dense"
        )
    if g > 1 and not grouped:
        raise TensorcutError(f"groups>1 not supported by {method}; leave the layer dense")


def rank_tuple(ranks: Any, n: int, method: str) -> tuple[int, ...]:
    """Validate a layer's ranks: an int (used for all ``n``) or ``n`` positive ints."""
    seq = [ranks] * n if isinstance(ranks, int) and not isinstance(ranks, bool) else ranks
    try:
        out = tuple(int(r.__index__()) for r in seq)
    except (TypeError, AttributeError):
        raise TensorcutError(
            f"{method} ranks must be {n} positive integers; got {ranks!r}"
        ) from None
    if len(out) != n or min(out) < 1:
        raise TensorcutError(f"{method} ranks must be {n} integers >= 1; got {ranks!r}")
    return out


def clamp_ranks(
    ranks: Any, maxima: tuple[int, ...], method: str, labels: tuple[str, ...]
) -> tuple[int, ...]:
    """Requested ranks (an int for all, or one per entry) clamped to ``maxima`` with a warning each.

    Ranks below 1 raise :class:`TensorcutError` naming the valid range.
    """
    from tensorcut.decompose.svd import clamp_rank

    n = len(maxima)
    seq = [ranks] * n if not isinstance(ranks, (tuple, list)) else list(ranks)
    if len(seq) != n:
        raise TensorcutError(f"{method} takes {n} rank(s) ({', '.join(labels)}); got {ranks!r}")
    return tuple(
        clamp_rank(r, m, name=f"{method} rank {lab}")
        for r, m, lab in zip(seq, maxima, labels, strict=True)
    )


def kernel_groups(conv: nn.Conv2d) -> list[torch.Tensor]:
    """The per-group ``(OUT/g, IN/g, KH, KW)`` kernels of ``conv``, detached, in float64 for the
    math.
    """
    W = conv.weight.detach().to(torch.float64)
    return list(W.chunk(conv.groups, dim=0))


@dataclass(frozen=True)
class MethodOptions:
    """A method's decomposition options, typed: one frozen dataclass per method (``Layer.Options``).

    A field left at ``None`` means the decomposition's own default. The CLI derives one flag per
    field (``--<method>-<field>``), and :class:`~tensorcut.compression.CompressConfig` validates
    ``options={method: {...}}`` through :meth:`parse`, so every option is reachable from both.
    """

    def kwargs(self) -> dict[str, Any]:
        """The options that were set, as keyword arguments for ``from_conv``."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def fast(self) -> MethodOptions:
        """Cheaper settings, used only to score budget candidates (never for an applied layer)."""
        return self

    @classmethod
    def parse(cls, method: str, value: Mapping[str, Any] | MethodOptions | None) -> MethodOptions:
        """``value`` (a mapping, an instance, or None) as this class, or a one-line error.

        Raises:
            TensorcutError: for an unknown option name (listing the valid ones) or a wrong type.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TensorcutError(
                f"options for {method} must be a dict or {cls.__name__}, got {type(value).__name__}"
            )
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            valid = ", ".join(names) if names else "none (this method takes no options)"
            raise TensorcutError(f"unknown options for {method}: {unknown}; valid: {valid}")
        return cls(**value)


class FactorizedConv2d(nn.Module):
    """Base class of factorized convolutions.

    Subclasses set ``method`` (the registry name), build their sublayers in
    ``__init__(geometry, ranks, ...)`` and implement ``from_conv``, ``to_conv``-style
    reconstruction via :meth:`reconstruct_weight`, and ``forward``.
    """

    #: the registry name (``register_method``)
    method: ClassVar[str] = ""
    #: the typed decomposition options of this method
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    #: whether ``method='auto'`` considers this method
    in_auto: ClassVar[bool] = True
    #: whether ``rank='vbmf'`` (VBMF rank estimate) applies; see :meth:`vbmf_ranks`
    supports_vbmf: ClassVar[bool] = False
    #: the method the planner uses when this one's decomposition does not converge
    fallback: ClassVar[str | None] = None
    #: whether the TDLRT integrator trains this layer (ungrouped ``first``/``core``/``last``
    #: Tucker-2 factors; see :mod:`tensorcut.train.tdlrt`)
    tdlrt_trainable: ClassVar[bool] = False
    geometry: ConvGeometry
    _pad_explicitly: bool = True  # layers whose spatial convs can pad set it from split_padding

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks of this factorization."""
        raise NotImplementedError

    # ---- what a parent module may read from the convolution it replaced (timm's EdgeNeXt and XCiT
    # read ``.weight.dtype``; others read channel counts or strides): the dense conv's attributes.
    @property
    def in_channels(self) -> int:
        """Input channels of the replaced convolution."""
        return self.geometry.in_channels

    @property
    def out_channels(self) -> int:
        """Output channels of the replaced convolution."""
        return self.geometry.out_channels

    @property
    def kernel_size(self) -> Pair:
        """Kernel size of the replaced convolution."""
        return self.geometry.kernel_size

    @property
    def stride(self) -> Pair:
        """Stride of the replaced convolution."""
        return self.geometry.stride

    @property
    def padding(self) -> Any:
        """Padding of the replaced convolution (a pair, ``'same'``, ``'valid'`` or
        ``'tf_same'``)."""
        return self.geometry.padding

    @property
    def dilation(self) -> Pair:
        """Dilation of the replaced convolution."""
        return self.geometry.dilation

    @property
    def groups(self) -> int:
        """Groups of the replaced convolution."""
        return self.geometry.groups

    @property
    def padding_mode(self) -> str:
        """Padding mode of the replaced convolution."""
        return self.geometry.padding_mode

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel this layer computes (read-only; reconstructed on each access)."""
        return self.reconstruct_weight()

    @classmethod
    def max_ranks(cls, geometry: ConvGeometry) -> tuple[int, ...]:
        """The largest useful ranks for a convolution of this geometry (exact reconstruction)."""
        raise NotImplementedError

    @classmethod
    def predicted_params(cls, geometry: ConvGeometry, ranks: Any) -> int:
        """Stored parameters (bias included) at ``ranks``, in closed form."""
        raise NotImplementedError

    @classmethod
    def predicted_macs(cls, geometry: ConvGeometry, ranks: Any, hw: Pair) -> int:
        """Multiply-accumulates per image at ``ranks`` for an input of size ``hw``, in closed
        form."""
        raise NotImplementedError

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: Any = None, **options: Any) -> FactorizedConv2d:
        """Factorize ``conv``'s kernel (explicit ``ranks``, or the method's rank options)."""
        raise NotImplementedError

    def reconstruct_weight(self) -> torch.Tensor:
        """The dense (OUT, IN/groups, KH, KW) kernel this layer computes."""
        raise NotImplementedError

    @classmethod
    def check_geometry(cls, geometry: ConvGeometry) -> None:
        """Refuse (TensorcutError with the reason) a convolution this method cannot factorize.

        The default refuses depthwise convolutions; methods with further limits override it."""
        check_groups(geometry, cls.method)

    @classmethod
    def vbmf_ranks(cls, weight: torch.Tensor) -> tuple[int, ...]:
        """Ranks estimated by VBMF for this kernel (only where ``supports_vbmf``)."""
        raise TensorcutError(
            f"rank='vbmf' does not apply to {cls.method}; use one of: "
            + ", ".join(sorted(n for n, c in LAYER_REGISTRY.items() if c.supports_vbmf))
        )

    @classmethod
    def decompose_kwargs(
        cls, options: MethodOptions, *, hw: Pair | None, explicit_ranks: bool
    ) -> dict[str, Any]:
        """Keyword arguments for :meth:`from_conv` from ``options`` for one layer, whose input is
        ``hw`` (H, W); ``explicit_ranks`` when the ranks are fixed (no rank search)."""
        return options.kwargs()

    @classmethod
    def reference_ranks(cls, geometry: ConvGeometry) -> tuple[int, ...]:
        """The ranks a rank *scale* applies to (speed and budget ladders): the maximal ranks,
        unless a method's maximum is far beyond any useful size (CP overrides it)."""
        return tuple(cls.max_ranks(geometry))

    @classmethod
    def error_bound(
        cls,
        weight: torch.Tensor,
        geometry: ConvGeometry,
        ranks: tuple[int, ...],
        cache: dict[str, Any],
    ) -> float | None:
        """A cheap upper bound on the relative kernel error at ``ranks`` without decomposing, or
        None when the method has none (the caller then decomposes). ``cache`` persists per
        kernel across calls (e.g. the unfoldings' spectra)."""
        return None

    def rebuild_options(self) -> dict[str, Any]:
        """Options beyond the ranks needed to rebuild exactly this layer from the dense kernel
        (recorded in the plan; e.g. the tensor ring's cyclic shift)."""
        return {}

    def _padded(self, y: torch.Tensor) -> torch.Tensor:
        """The leading 1x1's output, padded here when the spatial convolutions cannot pad it
        themselves (``self._pad_explicitly``, from :func:`split_padding` at construction)."""
        return explicit_pad(y, self.geometry) if self._pad_explicitly else y

    def to_conv(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (dense reconstruction)."""
        conv = self.geometry.make_conv()
        w = self.reconstruct_weight()
        conv = conv.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            if conv.bias is not None:
                conv.bias.copy_(cast(torch.Tensor, self.bias))
        return conv

    def num_params(self) -> int:
        """Stored parameters of this layer (bias included)."""
        return sum(p.numel() for p in self.parameters())

    def macs(self, hw: Pair) -> int:
        """Multiply-accumulates per image for an input of spatial size ``hw`` (the closed form of
        :meth:`predicted_macs`, which the cost model uses everywhere)."""
        return int(type(self).predicted_macs(self.geometry, tuple(self.ranks), hw))

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (geometry + ranks + options).

        Subclasses with extra constructor options add them under ``"options"``.
        """
        return {
            "method": self.method,
            "geometry": self.geometry.to_dict(),
            "ranks": list(self.ranks),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> FactorizedConv2d:
        """Rebuild the (uninitialised) layer described by :meth:`config`; load a state_dict next."""
        return cls(
            ConvGeometry.from_dict(cfg["geometry"]),
            tuple(int(r) for r in cfg["ranks"]),
            **cfg.get("options", {}),
        )

    def reset_parameters(self) -> None:
        """Randomly (re)initialise every sublayer as ``nn.Conv2d`` does, e.g. to train from
        scratch."""
        for m in self.modules():
            if m is not self and isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, "
            f"padding={g.padding!r}, dilation={g.dilation}, ranks={self.ranks}"
        )


def fold_affine_(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """In place: ``conv`` afterwards computes ``scale[c] * conv(x) + shift[c]`` per output channel.

    The weights are scaled, the bias becomes ``scale * bias + shift`` (created when there was none).
    The arithmetic is done in float64, then cast to the weights' dtype.
    """
    w = conv.weight
    if scale.shape != (w.shape[0],) or shift.shape != (w.shape[0],):
        raise TensorcutError(
            f"an output affine needs {w.shape[0]} scales and shifts; got {tuple(scale.shape)}, "
            f"{tuple(shift.shape)}"
        )
    s = scale.to(torch.float64).to(w.device)
    b = shift.to(torch.float64).to(w.device)
    with torch.no_grad():
        new_w = (w.detach().to(torch.float64) * s.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        if conv.bias is not None:
            b = b + s * conv.bias.detach().to(torch.float64)
        conv.weight = nn.Parameter(new_w, requires_grad=w.requires_grad)
        conv.bias = nn.Parameter(b.to(w.dtype), requires_grad=w.requires_grad)
