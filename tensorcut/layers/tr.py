r"""``TRConv2d``: a convolution whose kernel is a tensor ring (RSDTR), run as four sublayers.

With ring ranks (a, b, c, d) and cores ``G_out`` (a, O, b), ``G_in`` (b, I, c),
``G_kh`` (c, KH, d), ``G_kw`` (d, KW, a), the forward pass for an input (N, I, H, W) is:

====  ================  ================================  ==================================
step  sublayer          weight shape                      output
====  ================  ================================  ==================================
1     ``in_proj`` 1x1   (b*c, I, 1, 1) = G_in, (b,c)xI    (N, b*c, H1, W1)
\-    ``explicit_pad``  --                                (N*b, c, Hp, Wp), after padding
2     ``vconv`` KHx1    (d, c, KH, 1) = G_kh              (N*b, d, H', Wp), vertical stride
3     ``hconv`` 1xKW    (a, d, 1, KW) = G_kw              (N*b, a, H', W'), horizontal stride
4     ``out_proj`` 1x1  (O, b*a, 1, 1) = G_out, Ox(b,a)   (N, O, H', W') + bias
====  ================  ================================  ==================================

Steps 2 and 3 apply the stride and dilation of their axis.

The ring index ``b`` rides along as part of the batch through the two 1-D convolutions (their
weights are shared across it, as the TR structure demands) and is closed, together with ``a``,
by the final 1x1 contraction. Padding of any mode is applied once, explicitly, after step 1,
with which it commutes. Along an axis with kernel extent 1 and no padding the stride is applied
already in step 1 (``H1 = ceil(H / s)``), otherwise ``H1 = H`` and the 1-D conv strides.

Parameters: ``a*O*b + b*I*c + c*KH*d + d*KW*a`` (+ O bias). MACs per image:
``I*b*c*H1*W1 + b*c*d*KH*H'*Wp + b*d*a*KW*H'*W' + b*a*O*H'*W'``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from tensorcut.decompose.svd import RankClampWarning
from tensorcut.decompose.tr import (
    TRResult,
    rsdtr,
    tr_macs,
    tr_max_ranks,
    tr_params,
    tr_svd,
    tr_to_tensor,
)
from tensorcut.errors import TensorcutError
from tensorcut.geometry import ConvGeometry, Pair, early_stride, explicit_pad
from tensorcut.layers.base import (
    FactorizedConv2d,
    MethodOptions,
    fold_affine_,
    make_conv,
    register_method,
)

__all__ = ["TRConv2d"]


def _refuse_groups(geometry: ConvGeometry) -> None:
    if geometry.groups != 1:
        kind = (
            "depthwise"
            if geometry.groups == geometry.in_channels == geometry.out_channels
            else "grouped"
        )
        raise TensorcutError(
            f"TR cannot factorize a {kind} convolution (groups={geometry.groups}): its kernel "
            "holds "
            f"only IN/groups={geometry.in_channels // geometry.groups} input channels per group, "
            "so one "
            "ring over (OUT, IN, KH, KW) does not describe it; leave this layer dense"
        )


def _check_ranks(ranks: int | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = (ranks,) * 4
    try:
        r = tuple(int(x) for x in cast(Sequence[int], ranks))
    except (TypeError, ValueError) as exc:
        raise TensorcutError(
            f"TR ranks must be four positive ints (a, b, c, d), got {ranks!r}"
        ) from exc
    if len(r) != 4 or min(r) < 1:
        raise TensorcutError(f"TR ranks must be four positive ints (a, b, c, d), got {ranks!r}")
    return (r[0], r[1], r[2], r[3])


@dataclass(frozen=True)
class TROptions(MethodOptions):
    """Tensor-ring settings; ``None`` keeps the default.

    With explicit ranks only ``shift`` applies (TR-SVD); with an error bound (``eps`` /
    ``energy``) the RSDTR search takes the others.
    """

    shift: int | None = field(
        default=None, metadata={"help": "cyclic shift of the ring's first core, 0..3 (default 0)"}
    )
    objective: str | None = field(
        default=None,
        metadata={"help": 'what RSDTR minimises: "params" or "macs" (default "params")'},
    )
    input_size: tuple[int, int] | None = field(
        default=None, metadata={"help": '(H, W) for objective "macs" (default: the layer\'s)'}
    )
    split: str | None = field(
        default=None,
        metadata={"help": 'error split across the ring: "uniform" or "zhao" (default uniform)'},
    )
    shifts: tuple[int, ...] | None = field(
        default=None, metadata={"help": "shifts RSDTR tries (default all four)"}
    )
    solver: str | None = field(
        default=None, metadata={"help": 'SVD solver: "auto", "svd" or "gram" (default "auto")'}
    )

    def __post_init__(self) -> None:
        if self.objective not in (None, "params", "macs"):
            raise TensorcutError(f"tr objective must be 'params' or 'macs', got {self.objective!r}")
        if self.split not in (None, "uniform", "zhao"):
            raise TensorcutError(f"tr split must be 'uniform' or 'zhao', got {self.split!r}")
        if isinstance(self.input_size, list):
            object.__setattr__(self, "input_size", tuple(self.input_size))
        if isinstance(self.shifts, list):
            object.__setattr__(self, "shifts", tuple(self.shifts))


@register_method
class TRConv2d(FactorizedConv2d):
    """Tensor-ring convolution (RSDTR): 1x1 -> KH x 1 -> 1 x KW -> 1x1, ring ranks (a, b, c, d)."""

    method = "tr"
    Options = TROptions

    @classmethod
    def check_geometry(cls, geometry: ConvGeometry) -> None:
        _refuse_groups(geometry)
        if geometry.dynamic:
            raise TensorcutError(
                "TR does not support TF-same padding at stride > 1 (padding computed from the "
                "input size); use tucker2, tucker, cp or tt for this layer"
            )

    @classmethod
    def decompose_kwargs(
        cls, options: MethodOptions, *, hw: Pair | None, explicit_ranks: bool
    ) -> dict[str, Any]:
        kw = options.kwargs()
        if explicit_ranks:  # fixed ranks fix the ring: the search options do not apply
            return {k: v for k, v in kw.items() if k == "shift"}
        if kw.get("objective") == "macs" and "input_size" not in kw and hw is not None:
            kw["input_size"] = tuple(hw)  # each layer's own input size
        return kw

    def rebuild_options(self) -> dict[str, Any]:
        res = getattr(self, "tr_result", None)
        return {"shift": int(res.shift)} if res is not None else {}

    def __init__(
        self,
        geometry: ConvGeometry,
        ranks: Sequence[int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _refuse_groups(geometry)
        self.geometry = geometry
        a, b, c, d = self._ranks = _check_ranks(ranks)
        kh, kw = geometry.kernel_size
        sh, sw = geometry.stride
        dh, dw = geometry.dilation
        eh, ew = early_stride(geometry)
        # an explicit device: skip_init-based make_conv would leave device=None tensors on "meta"
        dev = torch.device(device) if device is not None else torch.empty(0).device
        kw_: dict[str, Any] = {"device": dev, "dtype": dtype}
        self.in_proj = make_conv(geometry.in_channels, b * c, (1, 1), stride=(eh, ew), **kw_)
        self.vconv = make_conv(c, d, (kh, 1), stride=(sh // eh, 1), dilation=(dh, 1), **kw_)
        self.hconv = make_conv(d, a, (1, kw), stride=(1, sw // ew), dilation=(1, dw), **kw_)
        self.out_proj = make_conv(b * a, geometry.out_channels, (1, 1), bias=geometry.bias, **kw_)
        self.tr_result: TRResult | None = None  # the decomposition that filled the weights, if any
        self.rel_error: float | None = None  # its relative Frobenius error, if known

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        ranks: int | Sequence[int] | None = None,
        *,
        eps: float | None = None,
        energy: float | None = None,
        **opts: Any,
    ) -> TRConv2d:
        """Factorize ``conv``'s kernel as a tensor ring.

        ``ranks=(a, b, c, d)`` (an int means all four): TR-SVD at those ranks, option ``shift``
        (0..3, default 0); ranks beyond what the kernel admits are clamped with a
        ``RankClampWarning``. ``eps`` in (0, 1): the RSDTR search under that relative-error
        bound, options ``objective`` ("params" or "macs"), ``input_size`` (H, W, needed for
        "macs"), ``split`` ("uniform" / "zhao"), ``shifts``, ``solver``. ``energy`` in (0, 1]
        means ``eps = sqrt(1 - energy)``. Nothing (or energy 1): exact, at :meth:`max_ranks`.
        """
        geom = ConvGeometry.from_conv(conv)
        _refuse_groups(geom)
        if ranks is not None and (eps is not None or energy is not None):
            raise TensorcutError("give ranks or eps/energy to TRConv2d.from_conv, not both")
        if eps is not None and energy is not None:
            raise TensorcutError("give eps or energy, not both")
        if energy is not None:
            if (
                isinstance(energy, bool)
                or not isinstance(energy, (int, float))
                or not 0.0 < float(energy) <= 1.0
            ):
                raise TensorcutError(
                    f"energy must be in (0, 1] (fraction of squared norm kept); got {energy!r}"
                )
            if float(energy) < 1.0:
                eps = math.sqrt(1.0 - float(energy))
        weight = conv.weight.detach()
        if eps is None:
            unknown = set(opts) - {"shift"}
            if unknown:
                raise TensorcutError(
                    f"unknown options with explicit ranks: {sorted(unknown)}; only 'shift' applies"
                )
            want = _check_ranks(ranks) if ranks is not None else cls.max_ranks(geom)
            res = tr_svd(weight, ranks=want, shift=opts.get("shift", 0))
            for note in res.notes:
                warnings.warn(f"TR {note}", RankClampWarning, stacklevel=2)
        else:
            unknown = set(opts) - {"objective", "input_size", "split", "shifts", "solver"}
            if unknown:
                raise TensorcutError(
                    f"unknown options with eps: {sorted(unknown)}; use objective, input_size, "
                    "split, shifts or solver"
                )
            res = rsdtr(
                weight,
                eps,
                objective=opts.get("objective", "params"),
                input_size=opts.get("input_size"),
                stride=geom.stride,
                padding=geom.pad,
                dilation=geom.dilation,
                split=opts.get("split", "uniform"),
                shifts=opts.get("shifts"),
                solver=opts.get("solver", "auto"),
            )
        layer = cls(geom, res.ranks, device=weight.device, dtype=weight.dtype)
        layer.load_cores(res.cores)
        if geom.bias:
            with torch.no_grad():
                layer.out_proj.bias.copy_(conv.bias.detach())  # type: ignore[union-attr]
        layer.tr_result = res
        layer.rel_error = res.rel_error
        return layer

    def load_cores(self, cores: Sequence[Tensor]) -> None:
        """Copy ring cores (OUT, IN, KH, KW order) into the sublayer weights."""
        a, b, c, d = self._ranks
        g = self.geometry
        kh, kw = g.kernel_size
        want = [(a, g.out_channels, b), (b, g.in_channels, c), (c, kh, d), (d, kw, a)]
        if len(cores) != 4 or any(tuple(x.shape) != w for x, w in zip(cores, want, strict=True)):
            raise TensorcutError(
                f"cores {[tuple(x.shape) for x in cores]} do not match ranks {self._ranks}: "
                f"expected {want}"
            )
        g_out, g_in, g_kh, g_kw = cores
        with torch.no_grad():
            self.in_proj.weight.copy_(g_in.permute(0, 2, 1).reshape(b * c, g.in_channels, 1, 1))
            self.vconv.weight.copy_(g_kh.permute(2, 0, 1).unsqueeze(-1))
            self.hconv.weight.copy_(g_kw.permute(2, 0, 1).unsqueeze(2))
            self.out_proj.weight.copy_(g_out.permute(1, 2, 0).reshape(g.out_channels, b * a, 1, 1))

    def cores(self) -> list[Tensor]:
        """The ring cores (OUT, IN, KH, KW order) read back from the sublayer weights."""
        a, b, c, d = self._ranks
        g = self.geometry
        g_in = self.in_proj.weight.reshape(b, c, g.in_channels).permute(0, 2, 1)
        g_kh = self.vconv.weight.squeeze(-1).permute(1, 2, 0)
        g_kw = self.hconv.weight.squeeze(2).permute(1, 2, 0)
        g_out = self.out_proj.weight.reshape(g.out_channels, b, a).permute(2, 0, 1)
        return [g_out, g_in, g_kh, g_kw]

    # ------------------------------------------------------------------ contract

    @property
    def ranks(self) -> tuple[int, int, int, int]:
        """Ring ranks (a, b, c, d): OUT core (a, O, b), IN (b, I, c), KH (c, KH, d), KW (d, KW,
        a)."""
        return self._ranks

    @property
    def bias(self) -> Tensor | None:
        """The output bias (held by ``out_proj``)."""
        return self.out_proj.bias

    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """Fold ``y -> scale[c] * y + shift[c]`` (e.g. a following BatchNorm in evaluation mode)
        into
        the last factor, in place: its weights are scaled and it gains a bias."""
        fold_affine_(self.out_proj, scale, shift)
        self.geometry = dataclasses.replace(self.geometry, bias=True)

    def reconstruct_weight(self) -> Tensor:
        """The dense (OUT, IN, KH, KW) kernel of the ring."""
        return tr_to_tensor(self.cores())

    @classmethod
    def predicted_params(cls, geometry: ConvGeometry, ranks: Sequence[int]) -> int:
        """``a*O*b + b*I*c + c*KH*d + d*KW*a`` plus the bias."""
        _refuse_groups(geometry)
        r = _check_ranks(ranks)
        shape = (geometry.out_channels, geometry.in_channels, *geometry.kernel_size)
        return tr_params(shape, r) + (geometry.out_channels if geometry.bias else 0)

    @classmethod
    def predicted_macs(cls, geometry: ConvGeometry, ranks: Sequence[int], hw: Pair) -> int:
        """Closed-form multiply-accumulates per image of the four sublayers at input size ``hw``."""
        _refuse_groups(geometry)
        r = _check_ranks(ranks)
        shape = (geometry.out_channels, geometry.in_channels, *geometry.kernel_size)
        return tr_macs(
            shape, r, hw, stride=geometry.stride, padding=geometry.pad, dilation=geometry.dilation
        )

    @classmethod
    def max_ranks(cls, geometry: ConvGeometry) -> tuple[int, int, int, int]:
        """Ranks at which ``from_conv`` reproduces any kernel exactly (shift 0, a tensor train)."""
        _refuse_groups(geometry)
        return tr_max_ranks((geometry.out_channels, geometry.in_channels, *geometry.kernel_size))

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        """Four sublayers; see the module docstring for the shapes."""
        lead = x.shape[
            :-3
        ]  # () for an unbatched (C, H, W) input; no branching, so torch.fx can trace it
        x4 = x.reshape((-1,) + x.shape[-3:])
        a, b, c, _ = self._ranks
        n = x4.shape[0]
        y = explicit_pad(
            self.in_proj(x4, torch.contiguous_format), self.geometry
        )  # (b, c) split: a view
        y = y.reshape(n * b, c, y.shape[-2], y.shape[-1])
        y = self.hconv(self.vconv(y))
        y = self.out_proj(y.reshape(n, b * a, y.shape[-2], y.shape[-1]), x4)
        return y.reshape(lead + y.shape[-3:])
