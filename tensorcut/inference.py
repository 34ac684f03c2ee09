"""Prepare a (compressed) model for inference: the same function, fewer and cheaper calls.

:func:`prepare_for_inference` returns an evaluation-mode copy in which

* every ``BatchNorm2d`` that provably consumes only the output of a convolution (dense
  ``nn.Conv2d`` or a factorized layer) is folded into that convolution: for a factorized layer
  into its *last* factor (``fold_output_affine``), which scales its output weights and takes the
  shift as its bias; the BatchNorm becomes ``nn.Identity``. "Provably" means a ``torch.fx`` trace
  (factorized layers kept as leaves) shows the BatchNorm's only input is that convolution's
  output and nothing else reads it; when the model cannot be traced, only ``conv, bn``
  neighbours inside a plain ``nn.Sequential`` are folded. Anything else is left alone.
* the 1x1 factors run as ordinary ``F.conv2d`` (``pointwise="conv"``, the default) instead of the
  factorized layers' GEMM path (``pointwise="gemm"``): an exported graph then has one ``Conv``
  node per factor (which ONNX Runtime fuses with a following bias/ReLU) instead of reshapes,
  transposes and a ``MatMul``; in eager PyTorch on CPU (channels-last, 1 thread, Tucker-2
  ResNet-18/-50 at 0.25x MACs, latency ratio to dense) the two were within noise at batch 1
  (0.362 vs 0.364 and 0.374 vs 0.380, 41 rounds) and the convolution faster at batch 32 (0.430
  vs 0.438 and 0.495 vs 0.539: oneDNN adds the bias inside the kernel).
* optionally (``cp_spatial="merged"``) CP's two depthwise 1-D convolutions become one
  depthwise ``KHxKW`` convolution (their outer product): one kernel call instead of two.

The result computes the same function up to floating-point rounding (the tests check float64
equality to ~1e-12 relative). BatchNorm folding uses the running statistics, so the copy is in
evaluation mode; do not train it.
"""

from __future__ import annotations

import copy
from collections import Counter
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.fx
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.layers import base as _base
from tensorcut.layers.base import FactorizedConv2d, PointwiseConv2d, fold_affine_
from tensorcut.timing import to_memory_format

if TYPE_CHECKING:
    from tensorcut.layers.cp import CPConv2d

__all__ = [
    "ConvPointwise2d",
    "MergedCPConv2d",
    "PointwiseChain",
    "cheapest_chain",
    "bn_affine",
    "conv_bn_pairs",
    "fold_affine_",
    "prepare_for_inference",
]


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(y) == scale[c] * y + shift[c]`` in evaluation mode (float64)."""
    if bn.running_mean is None or bn.running_var is None:
        raise TensorcutError(
            "a BatchNorm without running statistics cannot be folded; leave it unfolded"
        )
    var = bn.running_var.detach().to(torch.float64)
    mean = bn.running_mean.detach().to(torch.float64)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(torch.float64)
    return scale, shift


class ConvPointwise2d(nn.Conv2d):
    """A 1x1 convolution that runs as plain ``F.conv2d``; accepts (and ignores) the ``like``
    argument factorized layers pass to their 1x1 factors. Same parameters as ``nn.Conv2d``."""

    def forward(self, x: torch.Tensor, like: Any = None) -> torch.Tensor:
        return super().forward(x)


class MergedCPConv2d(nn.Module):
    """A CP convolution for inference: 1x1 -> one depthwise KHxKW (the two 1-D factors' outer
    product) -> 1x1. Built by :func:`prepare_for_inference` from a ``CPConv2d``."""

    def __init__(self, cp: CPConv2d) -> None:
        super().__init__()
        self.geometry = cp.geometry
        self._pad_explicitly = cp._pad_explicitly
        v, h = cp.vertical, cp.horizontal
        pv, ph = v.padding, h.padding
        assert not isinstance(pv, str) and not isinstance(ph, str)  # the 1-D factors pad by numbers
        ch = v.out_channels
        self.first = cp.first
        self.last = cp.last
        self.spatial = nn.Conv2d(
            ch,
            ch,
            (v.kernel_size[0], h.kernel_size[1]),
            stride=(v.stride[0], h.stride[1]),
            padding=(pv[0], ph[1]),
            dilation=(v.dilation[0], h.dilation[1]),
            groups=ch,
            bias=False,
            device=v.weight.device,
            dtype=v.weight.dtype,
        )
        with torch.no_grad():
            k = (
                v.weight.detach().to(torch.float64)[:, :, :, :1]
                * h.weight.detach().to(torch.float64)[:, :, :1, :]
            )
            self.spatial.weight.copy_(k.to(v.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        if self._pad_explicitly:
            from tensorcut.geometry import explicit_pad

            y = explicit_pad(y, self.geometry)
        return self.last(self.spatial(y), x)


def _dense_matrix(conv: nn.Conv2d) -> torch.Tensor:
    """The (out, in) matrix of a 1x1 convolution (groups 1, or depthwise: a diagonal), float64."""
    w = conv.weight.detach().to(torch.float64)
    if conv.groups == 1:
        return w.reshape(w.shape[0], w.shape[1])
    if conv.groups == conv.in_channels == conv.out_channels:
        return torch.diag(w.reshape(-1))
    raise TensorcutError("grouped 1x1 factors are not merged")


def _pointwise_factors(layer: nn.Module) -> list[nn.Conv2d] | None:
    """The factors of a factorized 1x1 layer as a chain of 1x1 convolutions.

    None when ``layer`` is not such a layer.

    Only layers whose every factor is an unpadded 1x1 convolution, the first carrying the stride
    and the others stride 1, with groups 1 (depthwise in between allowed) and no explicit padding.
    """
    if (
        not isinstance(layer, FactorizedConv2d)
        or layer.geometry.kernel_size != (1, 1)
        or layer.geometry.groups != 1
    ):
        return None
    if getattr(layer, "_pad_explicitly", True) and (
        getattr(layer.geometry, "dynamic", False) or any(layer.geometry.pad)
    ):
        return None
    order = [n for n in ("first", "core", "vertical", "horizontal", "last") if hasattr(layer, n)]
    if not order or order[0] != "first" or order[-1] != "last":
        return None
    convs = [getattr(layer, n) for n in order]
    if not all(
        isinstance(c, nn.Conv2d)
        and tuple(c.kernel_size) == (1, 1)
        and tuple(c.padding) == (0, 0)
        and tuple(c.dilation) == (1, 1)
        for c in convs
    ):
        return None
    if any(tuple(c.stride) != (1, 1) for c in convs[1:]) or any(
        c.bias is not None for c in convs[:-1]
    ):
        return None
    if any(c.groups != 1 and not (c.groups == c.in_channels == c.out_channels) for c in convs):
        return None
    return convs


def cheapest_chain(dims: list[int]) -> list[int]:
    """Indices of ``dims`` (the widths along a chain of linear maps) to keep so that the merged
    chain has the fewest multiply-accumulates: a merged step ``a -> b`` costs ``dims[a] * dims[b]``.
    The first and last are always kept."""
    n = len(dims)
    best = [0.0] + [float("inf")] * (n - 1)
    prev = [0] * n
    for b in range(1, n):
        for a in range(b):
            c = best[a] + dims[a] * dims[b]
            if c < best[b]:
                best[b], prev[b] = c, a
    path = [n - 1]
    while path[-1] != 0:
        path.append(prev[path[-1]])
    return path[::-1]


class PointwiseChain(nn.Module):
    """A factorized 1x1 convolution for inference: its linear factors merged into the chain of
    1x1 GEMMs with the fewest MACs (:func:`cheapest_chain`).

    Built by :func:`prepare_for_inference`.
    """

    def __init__(self, layer: nn.Module, convs: list[nn.Conv2d]) -> None:
        super().__init__()
        from tensorcut.layers.base import make_conv

        self.geometry = layer.geometry
        mats = [_dense_matrix(c) for c in convs]
        dims = [mats[0].shape[1]] + [m.shape[0] for m in mats]
        keep = cheapest_chain(dims)
        w0 = convs[0].weight
        s0 = convs[0].stride
        last_bias = convs[-1].bias
        steps = []
        for k, (a, b) in enumerate(pairwise(keep)):
            m = mats[a]
            for j in range(a + 1, b):
                m = mats[j] @ m
            last = b == len(dims) - 1
            conv = make_conv(
                dims[a],
                dims[b],
                (1, 1),
                stride=(s0[0], s0[1]) if k == 0 else (1, 1),
                bias=last and last_bias is not None,
                device=w0.device,
                dtype=w0.dtype,
            )
            with torch.no_grad():
                conv.weight.copy_(m.reshape(dims[b], dims[a], 1, 1).to(w0.dtype))
                if conv.bias is not None and last_bias is not None:  # the last step only
                    conv.bias.copy_(last_bias.detach())
            steps.append(conv)
        self.steps = nn.ModuleList(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        n = len(self.steps)
        for i, conv in enumerate(self.steps):
            y = conv(y, x) if i == n - 1 else conv(y)
        return y


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps factorized layers (and torch.nn modules) as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(
            m, (FactorizedConv2d, PointwiseChain, MergedCPConv2d)
        ) or super().is_leaf_module(m, qualname)


def _plain_conv(m: nn.Module) -> bool:
    """A convolution whose output is exactly ``conv2d(x, weight) + bias`` (no custom forward)."""
    plain = (nn.Conv2d, PointwiseConv2d, ConvPointwise2d, getattr(_base, "SameConv2d", nn.Conv2d))
    return type(m) in plain and m.padding_mode == "zeros"


@runtime_checkable
class _AffineFoldable(Protocol):
    """A factorized layer that can take a per-output-channel affine map into its last factor."""

    def fold_output_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None: ...


def _foldable(m: nn.Module) -> bool:
    return _plain_conv(m) or (isinstance(m, FactorizedConv2d) and isinstance(m, _AffineFoldable))


def _is_bn(m: nn.Module) -> bool:
    return type(m) is nn.BatchNorm2d and m.track_running_stats and m.running_mean is not None


def _fx_pairs(model: nn.Module) -> list[tuple[str, str]]:
    graph = _LeafTracer().trace(model)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_bn(model.get_submodule(str(node.target))):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if (
            src.op != "call_module"
            or len(src.users) != 1
            or not _foldable(model.get_submodule(str(src.target)))
        ):
            continue
        if calls[node.target] == 1 and calls[src.target] == 1:
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        kids = list(seq.named_children())
        for (n1, m1), (n2, m2) in pairwise(kids):
            if _foldable(m1) and _is_bn(m2) and uses[id(m1)] == 1 and uses[id(m2)] == 1:
                pre = f"{name}." if name else ""
                pairs.append((pre + n1, pre + n2))
    return pairs


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` module names where the BatchNorm reads only that convolution's
    output and nothing else reads it (fx trace; plain ``nn.Sequential`` neighbours when the
    model cannot be traced)."""
    try:
        return _fx_pairs(model)
    except Exception:  # noqa: BLE001 - any model fx cannot trace falls back to the provable Sequential rule
        return _sequential_pairs(model)


def _fold(conv: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    if isinstance(conv, FactorizedConv2d):
        assert isinstance(conv, _AffineFoldable)  # checked by _foldable
        conv.fold_output_affine(scale, shift)
    else:
        assert isinstance(conv, nn.Conv2d)  # a plain convolution: checked by _foldable
        fold_affine_(conv, scale, shift)


def _swap_pointwise(model: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        if type(m) is PointwiseConv2d:
            c = ConvPointwise2d(
                m.in_channels,
                m.out_channels,
                1,
                stride=(m.stride[0], m.stride[1]),
                groups=m.groups,
                bias=m.bias is not None,
                device=m.weight.device,
                dtype=m.weight.dtype,
            )
            c.load_state_dict(m.state_dict())
            model.set_submodule(name, c)


def _merge_cp(model: nn.Module) -> None:
    from tensorcut.layers.cp import CPConv2d

    for name, m in list(model.named_modules()):
        if type(m) is CPConv2d:
            model.set_submodule(name, MergedCPConv2d(m))


def _merge_chains(model: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        convs = _pointwise_factors(m)
        if convs is not None:
            model.set_submodule(name, PointwiseChain(m, convs))


def prepare_for_inference(
    model: nn.Module,
    *,
    fold_bn: bool = True,
    merge_pointwise: bool = True,
    channels_last: bool = True,
    pointwise: str = "conv",
    cp_spatial: str = "separable",
) -> nn.Module:
    """An evaluation-mode copy of ``model`` that computes the same function faster.

    ``fold_bn``: fold BatchNorms into the convolutions that feed them (see the module docstring).
    ``pointwise``: ``'conv'`` (default) runs 1x1 factors as plain convolutions (as fast or faster
    in eager PyTorch on CPU, channels-last; for export, ONNX Runtime fuses them), ``'gemm'`` keeps
    the factorized layers' 1x1 GEMM path. ``merge_pointwise``: a factorized *1x1* convolution
    (all factors linear maps with nothing between them) becomes the chain of merged factors with
    the fewest MACs (for Tucker-2 two GEMMs instead of three). ``channels_last``: parameters
    (and so every convolution's output) in channels-last memory format, which is much faster for
    CPU pooling and small convolutions; inputs may stay contiguous. ``cp_spatial``:
    ``'separable'`` keeps CP's two 1-D depthwise convolutions, ``'merged'`` runs one depthwise
    KHxKW convolution instead. ``model`` itself is not changed.
    """
    if pointwise not in ("gemm", "conv"):
        raise TensorcutError(f"pointwise must be 'gemm' or 'conv', got {pointwise!r}")
    if cp_spatial not in ("separable", "merged"):
        raise TensorcutError(f"cp_spatial must be 'separable' or 'merged', got {cp_spatial!r}")
    out = copy.deepcopy(model).eval()
    if fold_bn:
        for conv_name, bn_name in conv_bn_pairs(out):
            bn = out.get_submodule(bn_name)
            assert isinstance(bn, nn.BatchNorm2d)  # conv_bn_pairs pairs BatchNorm2d layers only
            scale, shift = bn_affine(bn)
            _fold(out.get_submodule(conv_name), scale, shift)
            out.set_submodule(bn_name, nn.Identity())
    if merge_pointwise:
        _merge_chains(out)
    if cp_spatial == "merged":
        _merge_cp(out)
    if pointwise == "conv":
        _swap_pointwise(out)
    if channels_last:
        out = to_memory_format(out)
    return out
