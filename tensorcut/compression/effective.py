"""What a convolution module computes, decided before tensorcut replaces it.

Users bring timm and torchvision networks whose convolutions are not always a plain
``nn.Conv2d``: some standardise their weight in ``forward`` (timm ``StdConv2d``,
``ScaledStdConv2d`` with its learned ``gain``), some pad from the input size (timm
``Conv2dSame``: TensorFlow "SAME"), some fold a BatchNorm and fake-quantize (PyTorch QAT).
Factorizing the stored ``.weight`` of such a module and dropping its ``forward`` would be
silently wrong. :func:`resolve` turns a module into the plain convolution it *effectively*
computes — the kernel it convolves with, its bias and its padding — or says why it must stay
dense. The planner factorizes only what this returns, and then checks the claim numerically on
the layer's real input (``tensorcut.compression``).

Handled exactly: a plain ``nn.Conv2d`` (or a subclass that overrides neither ``forward`` nor
``_conv_forward``; a ``torch.nn.utils.parametrize`` parametrization is folded into the kernel);
timm ``Conv2dSame`` / ``Conv2dSameExport`` (TF-same padding, dynamic for stride > 1),
``StdConv2d`` / ``StdConv2dSame`` (weight standardisation), ``ScaledStdConv2d`` /
``ScaledStdConv2dSame`` (scaled standardisation with ``gain`` folded in). Left dense with a
reason: PyTorch quantization-aware modules, modules with forward hooks, and any other subclass
that overrides ``forward`` (reason ``custom forward (<class>)``) unless the caller opts in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.geometry import SameConv2d, pair

__all__ = ["Resolved", "resolve", "known_kinds", "refuse_scripted"]


def refuse_scripted(model: nn.Module) -> None:
    """Refuse a TorchScript model (or one holding a TorchScript part with convolutions).

    Why: ``torch.jit.script`` / ``torch.jit.trace`` turn every layer into a compiled
    ``RecursiveScriptModule`` that is no ``nn.Conv2d`` and cannot be swapped, so the model would
    look as if it had no convolutions ("no Conv2d layers", an empty inventory). The eager module
    it was made from is what tensorcut plans, compresses and inspects.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TensorcutError(
            f"the model is TorchScript ({type(model).__name__}, from torch.jit.script or "
            "torch.jit.trace), whose layers cannot be read or replaced; pass the eager nn.Module "
            "it was made from (script or trace the compressed model afterwards)"
        )
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule) and any(p.dim() == 4 for p in m.parameters()):
            raise TensorcutError(
                f"submodule {name!r} is TorchScript ({type(m).__name__}, from torch.jit.script or "
                "torch.jit.trace) and its convolutions cannot be read or replaced; build the model "
                "with the eager module in its place"
            )


@dataclass
class Resolved:
    """The plain convolution a module computes: ``conv`` holds the effective kernel and bias
    (detached copies) and the module's padding; ``kind`` names how it was read."""

    conv: nn.Conv2d
    kind: str


def _is_plain(module: nn.Conv2d) -> bool:
    cls = type(module)
    return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward


def _standardised(module: nn.Conv2d, scale: torch.Tensor | None) -> torch.Tensor:
    """Weight standardisation per output channel (biased variance, as batch_norm in training
    mode), optionally times a per-channel ``scale``; computed in float64 then cast back."""
    w = module.weight.detach()
    flat = w.to(torch.float64).reshape(w.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    eps = float(getattr(module, "eps", 1e-6))
    out = (flat - mean) / torch.sqrt(var + eps)
    if scale is not None:
        out = out * scale.detach().to(torch.float64).reshape(-1, 1)
    return out.reshape(w.shape).to(w.dtype)


def _std_kernel(module: nn.Conv2d) -> torch.Tensor:
    return _standardised(module, None)


def _scaled_std_kernel(module: nn.Conv2d) -> torch.Tensor:
    gain = cast(torch.Tensor, module.gain)
    scale = float(cast(float, module.scale))
    return _standardised(module, gain.reshape(-1) * scale)


def _plain_kernel(module: nn.Conv2d) -> torch.Tensor:
    return module.weight.detach()


def _always_same(module: nn.Conv2d) -> bool:
    return True


def _same_if_flagged(module: nn.Conv2d) -> bool:
    return bool(getattr(module, "same_pad", False))


def _never_same(module: nn.Conv2d) -> bool:
    return False


# class name (in timm) -> (kernel function, dynamic-same predicate, description)
_TIMM: dict[str, tuple[Callable[[nn.Conv2d], torch.Tensor], Callable[[nn.Conv2d], bool], str]] = {
    "Conv2dSame": (_plain_kernel, _always_same, "timm Conv2dSame (TF-same padding)"),
    "Conv2dSameExport": (_plain_kernel, _always_same, "timm Conv2dSameExport (TF-same padding)"),
    "StdConv2d": (_std_kernel, _never_same, "timm StdConv2d (standardised kernel)"),
    "StdConv2dSame": (_std_kernel, _same_if_flagged, "timm StdConv2dSame (standardised kernel)"),
    "ScaledStdConv2d": (
        _scaled_std_kernel,
        _never_same,
        "timm ScaledStdConv2d (scaled standardised kernel, gain folded)",
    ),
    "ScaledStdConv2dSame": (
        _scaled_std_kernel,
        _same_if_flagged,
        "timm ScaledStdConv2dSame (scaled standardised kernel, gain folded)",
    ),
}


def known_kinds() -> list[str]:
    """The Conv2d subclasses (besides plain ones) that tensorcut factorizes exactly."""
    return [f"timm.layers.{n}" for n in sorted(_TIMM)]


def _copy_conv(module: nn.Conv2d, weight: torch.Tensor, same: bool) -> nn.Conv2d:
    kw: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
    stride, dilation = pair(module.stride), pair(module.dilation)
    if same and stride != (1, 1):
        conv: nn.Conv2d = SameConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,  # type: ignore[arg-type]
            stride=stride,
            dilation=dilation,
            groups=module.groups,
            bias=module.bias is not None,
            **kw,
        )
    else:
        # TF-same at stride 1 pads (k - 1) * d in total, the odd unit after: exactly PyTorch's
        # 'same'
        padding = "same" if same else module.padding
        conv = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,  # type: ignore[arg-type]
            stride=stride,
            padding=cast("str | tuple[int, int]", padding),
            dilation=dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            **kw,
        )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if module.bias is not None:
            conv.bias.copy_(module.bias.detach())  # type: ignore[union-attr]
    conv.weight.requires_grad_(module.weight.requires_grad)
    if conv.bias is not None and module.bias is not None:
        conv.bias.requires_grad_(module.bias.requires_grad)
    return conv


def resolve(module: nn.Module, *, allow_custom_forward: bool = False) -> Resolved | str:
    """The plain convolution ``module`` computes, or the reason it is left dense.

    Args:
        module: an ``nn.Conv2d`` (any subclass).
        allow_custom_forward: read an unknown subclass's ``.weight`` and padding as if it were a
            plain convolution (the planner still verifies that claim on real inputs).

    Returns:
        :class:`Resolved`, or a one-line reason string.

    Example:
        >>> r = resolve(nn.Conv2d(4, 8, 3, padding=1))
        >>> r.kind
        'nn.Conv2d'
    """
    if not isinstance(module, nn.Conv2d):
        return f"not a Conv2d ({type(module).__name__})"
    cls = type(module)
    name = cls.__name__
    path = cls.__module__
    if path.startswith(("torch.ao.nn", "torch.nn.qat", "torch.nn.intrinsic", "torch.nn.quantized")):
        return (
            f"quantization-aware {name}: its kernel is fake-quantized (and BatchNorm folded) in "
            "forward, "
            "so it has no fixed kernel to factorize"
        )
    if module._forward_hooks or module._forward_pre_hooks:
        return f"forward hooks attached to {name} (they may change what it computes)"
    if module.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return (
            f"weight dtype {module.weight.dtype} is not a floating point type tensorcut factorizes"
        )
    if module.padding_mode != "zeros" and not isinstance(module.padding, (tuple, list, int)):
        return (
            f"padding {module.padding!r} with padding_mode {module.padding_mode!r} is not supported"
        )
    if path.startswith("timm.") and name in _TIMM:
        kernel, same, kind = _TIMM[name]
        return Resolved(_copy_conv(module, kernel(module), same(module)), kind)
    if isinstance(module, SameConv2d):
        return Resolved(
            _copy_conv(module, module.weight.detach(), True),
            "tensorcut SameConv2d (TF-same padding)",
        )
    if _is_plain(module):
        kind = "nn.Conv2d" if cls is nn.Conv2d else f"{name} (nn.Conv2d forward)"
        if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
            kind += ", parametrized weight folded"
        return Resolved(_copy_conv(module, module.weight.detach(), False), kind)
    if allow_custom_forward:
        return Resolved(
            _copy_conv(module, module.weight.detach(), False),
            f"{name} (custom forward, read as plain: opted in)",
        )
    return f"custom forward ({name})"
