"""Numeric checks of every swap, on each layer's real input.

Before ``plan`` proposes replacing a convolution it has captured that convolution's input
(and output) on a calibration batch. :func:`check_swap` then establishes two facts, each to a
tolerance derived from floating-point accumulation, not from numbers seen on one machine:

1. the module computes a plain convolution with the *effective* kernel tensorcut read from it
   (:mod:`tensorcut.compression.effective`) — otherwise the module is not what tensorcut thinks it
   is;
2. the factorized layer computes a convolution with its own reconstructed kernel — otherwise
   its sublayers do not implement its factors (for instance through cancellation in ill-conditioned
   CP factors).

Then the layer's measured output error against the original module is exactly the error its
kernel approximation causes on that input, and is recorded in the plan.

Tolerance: a float sum of ``K`` products has a relative error of order ``sqrt(K) * eps`` of the
sum of absolute values (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1, with
random rounding); we allow ``64 * sqrt(K) * eps`` of ``‖conv(|x|, |W|)‖``, where ``K`` counts the
products along the longest accumulation chain (dense kernel fan-in plus the factor fan-ins).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from tensorcut.errors import TensorcutError

__all__ = ["Capture", "SwapCheck", "capture", "check_swap", "relative_difference"]

SAFETY = 64.0


@dataclass
class Capture:
    """What one forward pass showed about each watched module (keyed by ``id(module)``)."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    sizes: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    model_output: Any = None


def capture(model: nn.Module, modules: Sequence[nn.Module], args: tuple[Any, ...]) -> Capture:
    """Run ``model(*args)`` once in eval mode without gradients; record each module's first input
    and output (copies) and the spatial size of every call.

    Raises:
        TensorcutError: the forward pass fails (one line naming the input shapes and the error).
    """
    cap = Capture()
    watched = {id(m): m for m in modules}

    def pre(m: nn.Module, inp: tuple[Any, ...]) -> None:
        x = inp[0] if inp else None
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            cap.sizes.setdefault(id(m), []).append((int(x.shape[-2]), int(x.shape[-1])))
            if id(m) not in cap.inputs:
                cap.inputs[id(m)] = x.detach().clone()

    def post(m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        if id(m) not in cap.outputs and isinstance(out, torch.Tensor):
            cap.outputs[id(m)] = out.detach().clone()

    handles = []
    for m in watched.values():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cap.model_output = model(*args)
    except Exception as e:  # the user's forward: any error is reported, with its type, in one line
        shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
        first = (str(e).splitlines() or [""])[0][:200]
        raise TensorcutError(
            f"the model's forward failed on an input of shape {shapes} ({type(e).__name__}: "
            f"{first}); "
            "give the input_shape (C, H, W) or calibration batch the model expects"
        ) from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return cap


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 (0 when both are zero, inf when only ``b`` is)."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    d = float(torch.linalg.vector_norm(a64 - b64))
    n = float(torch.linalg.vector_norm(b64))
    if n == 0.0:
        return 0.0 if d == 0.0 else math.inf
    return d / n


def _conv_with(
    conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    """``conv``'s forward (its padding and geometry) with another weight and bias."""
    params = {"weight": weight}
    if getattr(conv, "bias", None) is not None:
        params["bias"] = (
            bias if bias is not None else torch.zeros_like(cast(torch.Tensor, conv.bias))
        )
    return torch.func.functional_call(conv, params, (x,))


def _eps(t: torch.Tensor) -> float:
    return float(torch.finfo(t.dtype).eps) if t.is_floating_point() else 0.0


@dataclass
class SwapCheck:
    """Result of :func:`check_swap`: ``ok``; the layer's output error against the original
    module; and, when not ok, the reason in one line."""

    ok: bool
    output_error: float
    reason: str = ""


def check_swap(
    effective: nn.Conv2d, layer: nn.Module, x: torch.Tensor, y_ref: torch.Tensor, chain: int = 0
) -> SwapCheck:
    """Check a planned swap on the captured input ``x`` and original output ``y_ref``.

    Args:
        effective: the plain convolution the module was resolved to (effective kernel, bias,
        padding).
        layer: the factorized layer that would replace it (same device and dtype).
        x: the module's captured input; ``y_ref``: its captured output.
        chain: extra products along the factorized layer's accumulation chain (its ranks summed
            with their kernel extents); widens the tolerance of the second check accordingly.

    Returns:
        :class:`SwapCheck`.
    """
    with torch.no_grad():
        w = effective.weight
        b = effective.bias
        k = w.shape[1] * w.shape[2] * w.shape[3]
        eps = max(_eps(x), _eps(w))
        y_eff = effective(x)
        scale = float(
            torch.linalg.vector_norm(
                _conv_with(effective, w.abs(), None if b is None else b.abs(), x.abs()).to(
                    torch.float64
                )
            )
        )
        d1 = float(torch.linalg.vector_norm((y_eff - y_ref).to(torch.float64)))
        if y_eff.shape != y_ref.shape or d1 > SAFETY * math.sqrt(k) * eps * scale:
            rel = relative_difference(y_eff, y_ref) if y_eff.shape == y_ref.shape else math.inf
            return SwapCheck(
                False,
                math.inf,
                "the module's output differs from a convolution with the kernel "
                f"tensorcut read from it (relative difference {rel:.2e}); not reproducible, left "
                "dense",
            )
        w_rec = layer.reconstruct_weight().to(w)  # type: ignore[operator]
        y_fac = layer(x)
        y_rec = _conv_with(effective, w_rec, b, x)
        scale2 = float(
            torch.linalg.vector_norm(
                _conv_with(effective, w_rec.abs(), None if b is None else b.abs(), x.abs()).to(
                    torch.float64
                )
            )
        )
        d2 = float(torch.linalg.vector_norm((y_fac - y_rec).to(torch.float64)))
        if y_fac.shape != y_rec.shape or d2 > SAFETY * math.sqrt(k + chain) * eps * max(
            scale2, scale
        ):
            rel = relative_difference(y_fac, y_rec) if y_fac.shape == y_rec.shape else math.inf
            return SwapCheck(
                False,
                math.inf,
                "the factorized layer's output deviates from a convolution with its own "
                f"kernel (relative difference {rel:.2e}; ill-conditioned factors); left dense",
            )
        return SwapCheck(True, relative_difference(y_fac, y_ref))
