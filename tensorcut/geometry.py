"""Convolution geometry: padding / stride / dilation algebra and output sizes.

:class:`ConvGeometry` is everything about a ``Conv2d`` except its weights; the factorized
layers, the cost model and the swap read it. :class:`SameConv2d` is the dense convolution with
TensorFlow-style "SAME" padding (timm's ``Conv2dSame``), whose geometry is ``'tf_same'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from tensorcut.errors import TensorcutError

__all__ = [
    "TF_SAME",
    "ConvGeometry",
    "Pair",
    "SameConv2d",
    "early_stride",
    "explicit_pad",
    "pair",
    "per_group",
    "split_padding",
    "stage_sizes",
]

Pair = tuple[int, int]
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]


def pair(v: int | Sequence[int], name: str = "value") -> Pair:
    """``v`` as an ``(h, w)`` pair: an int repeated, a 1-tuple repeated, or a pair.

    Raises:
        TensorcutError: ``v`` is a bool, or a sequence of any other length (``name`` says which
            argument).
    """
    if isinstance(v, bool):
        raise TensorcutError(f"{name} must be an int or a pair, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise TensorcutError(f"{name} must be an int or a pair, got {v!r}")
    return (t[0], t[1])


TF_SAME = "tf_same"


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow-style "SAME" padding computed from each input's size
    (what timm's ``Conv2dSame`` computes): output size ``ceil(input / stride)``.

    ``padding`` reads ``'tf_same'``; the padding actually applied comes from
    :meth:`ConvGeometry.pad_at`. tensorcut builds it when it decompresses a factorized layer of
    such a convolution, so the dense form computes exactly what the original did.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Pair,
        *,
        stride: int | Pair = 1,
        dilation: int | Pair = 1,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=0,
            dilation=dilation,
            groups=groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.padding = TF_SAME

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        geom = ConvGeometry.from_conv(self)
        x = F.pad(x, geom.pad_at((x.shape[-2], x.shape[-1])))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a Conv2d except its weights.

    ``pad`` is the explicit (left, right, top, bottom) padding, resolved from int, tuple,
    ``'same'`` or ``'valid'`` so that even kernels with ``'same'`` are exact.
    """

    in_channels: int
    out_channels: int
    kernel_size: Pair
    stride: Pair = (1, 1)
    padding: Any = 0
    dilation: Pair = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"
    bias: bool = True

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ConvGeometry:
        """Read the geometry of an ``nn.Conv2d`` (a :class:`SameConv2d` has
        ``padding='tf_same'``)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        padding = (
            TF_SAME
            if isinstance(conv, SameConv2d)
            else (conv.padding if isinstance(conv.padding, str) else pair(conv.padding))
        )
        return cls(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=pair(conv.kernel_size),
            stride=pair(conv.stride),
            padding=padding,
            dilation=pair(conv.dilation),
            groups=conv.groups,
            padding_mode=conv.padding_mode,
            bias=conv.bias is not None,
        )

    @property
    def dynamic(self) -> bool:
        """True for TF-style "same" padding (``padding='tf_same'``), which depends on the input
        size.
        """
        return self.padding == TF_SAME

    def pad_at(self, hw: Pair) -> tuple[int, int, int, int]:
        """Explicit (left, right, top, bottom) padding for an input of spatial size ``hw``.

        Static paddings ignore ``hw``; ``'tf_same'`` pads as TensorFlow's "SAME" (and timm's
        ``Conv2dSame``): total ``max((ceil(i/s) - 1) * s + (k - 1) * d + 1 - i, 0)`` per axis, the
        odd
        unit after (right / bottom).
        """
        if not self.dynamic:
            return self.pad
        out = []
        for i, k, s, d in (
            (hw[1], self.kernel_size[1], self.stride[1], self.dilation[1]),
            (hw[0], self.kernel_size[0], self.stride[0], self.dilation[0]),
        ):
            total = max((-(-int(i) // s) - 1) * s + (k - 1) * d + 1 - int(i), 0)
            out += [total // 2, total - total // 2]
        return (out[0], out[1], out[2], out[3])

    @property
    def pad(self) -> tuple[int, int, int, int]:
        """Explicit (left, right, top, bottom) padding, as ``F.pad`` takes it (static paddings only;
        ``'tf_same'`` depends on the input size: use :meth:`pad_at`)."""
        if self.dynamic:
            raise TensorcutError(
                "TF-same padding depends on the input size; use ConvGeometry.pad_at(hw)"
            )
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            out = []
            for k, d in (
                (self.kernel_size[1], self.dilation[1]),
                (self.kernel_size[0], self.dilation[0]),
            ):
                total = d * (k - 1)
                left = total // 2
                out += [left, total - left]
            return (out[0], out[1], out[2], out[3])
        ph, pw = pair(self.padding)
        return (pw, pw, ph, ph)

    def output_size(self, hw: Pair) -> Pair:
        """Spatial output size for an input of size ``hw``."""
        left, r, t, b = self.pad_at(hw)
        h = (hw[0] + t + b - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        w = (hw[1] + left + r - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[
            1
        ] + 1
        return (h, w)

    def dense_params(self) -> int:
        """Parameters of the dense convolution (weights + bias)."""
        kh, kw = self.kernel_size
        return self.out_channels * (self.in_channels // self.groups) * kh * kw + (
            self.out_channels if self.bias else 0
        )

    def dense_macs(self, hw: Pair) -> int:
        """Multiply-accumulates of the dense convolution per image."""
        oh, ow = self.output_size(hw)
        kh, kw = self.kernel_size
        return self.out_channels * (self.in_channels // self.groups) * kh * kw * oh * ow

    def make_conv(self) -> nn.Conv2d:
        """A dense ``nn.Conv2d`` with this geometry (uninitialised weights); ``'tf_same'``
        padding gives a :class:`SameConv2d`."""
        if self.dynamic:
            return SameConv2d(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                stride=self.stride,
                dilation=self.dilation,
                groups=self.groups,
                bias=self.bias,
            )
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            padding_mode=cast(PaddingMode, self.padding_mode),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "padding_mode": self.padding_mode,
            "bias": self.bias,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvGeometry:
        """Inverse of :meth:`to_dict`."""
        padding = d["padding"] if isinstance(d["padding"], str) else pair(d["padding"])
        return cls(
            in_channels=int(d["in_channels"]),
            out_channels=int(d["out_channels"]),
            kernel_size=pair(d["kernel_size"]),
            stride=pair(d["stride"]),
            padding=padding,
            dilation=pair(d["dilation"]),
            groups=int(d.get("groups", 1)),
            padding_mode=str(d.get("padding_mode", "zeros")),
            bias=bool(d.get("bias", True)),
        )


def per_group(geometry: ConvGeometry) -> tuple[int, int, int, int, int]:
    """(groups, OUT per group, IN per group, KH, KW) of a convolution."""
    g = geometry.groups
    kh, kw = geometry.kernel_size
    return g, geometry.out_channels // g, geometry.in_channels // g, kh, kw


def explicit_pad(x: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """Pad ``x`` as the dense convolution would, honouring ``padding_mode`` (and, for
    ``'tf_same'``, the size of ``x``)."""
    pad = geom.pad_at((x.shape[-2], x.shape[-1])) if geom.dynamic else geom.pad
    if not any(pad):
        return x
    mode = {
        "zeros": "constant",
        "reflect": "reflect",
        "replicate": "replicate",
        "circular": "circular",
    }[geom.padding_mode]
    return F.pad(x, pad, mode=mode)


def split_padding(geom: ConvGeometry) -> tuple[Pair, bool]:
    """Where a factorized layer pads: ``((pad_h, pad_w), False)`` when the padding is zeros and
    symmetric per axis (the spatial convolutions pad, no copy), else ``((0, 0), True)``: the
    leading 1x1's output goes through :func:`explicit_pad` (always for ``'tf_same'``)."""
    if geom.dynamic:
        return (0, 0), True
    left, r, t, b = geom.pad
    if geom.padding_mode == "zeros" and left == r and t == b:
        return (t, left), False
    return (0, 0), True


def early_stride(geom: ConvGeometry) -> Pair:
    """Stride that may move into a leading 1x1 convolution without changing the result.

    Along an axis whose kernel size is 1 and whose padding is 0, a strided convolution only
    reads every ``stride``-th input row/column, so subsampling in the first 1x1 (before the
    channel contraction) is exact and saves its MACs. Other axes return 1.
    """
    from tensorcut.decompose.tr import early_strides  # one rule, shared with the TR cost model

    if geom.dynamic:  # the padding is computed from the input size: subsample only after padding
        return (1, 1)
    return early_strides(geom.kernel_size, geom.stride, geom.pad)


def stage_sizes(geom: ConvGeometry, hw: Pair) -> tuple[Pair, Pair, Pair]:
    """Spatial sizes through a factorized layer: after the leading 1x1 (with :func:`early_stride`),
    after explicit padding (:func:`split_padding`; unchanged when the convolutions pad), and at
    the output. Used by the closed-form MAC counts."""
    eh, ew = early_stride(geom)
    h1, w1 = (hw[0] - 1) // eh + 1, (hw[1] - 1) // ew + 1
    if not split_padding(geom)[1]:
        return (h1, w1), (h1, w1), geom.output_size(hw)
    left, r, t, b = geom.pad_at(hw)
    return (h1, w1), (h1 + t + b, w1 + left + r), geom.output_size(hw)
