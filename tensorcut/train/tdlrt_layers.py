"""The TDLRT view of a Tucker-2 layer: its factors ``(U_out, C, U_in)`` read from and written to the
three convolutions ``first`` / ``core`` / ``last``, the rank bounds, and :func:`rank_report`.

A layer the integrator trains (:func:`is_tucker_layer`) stores ``U_in^T`` as the weight of
``first`` (1x1), the core ``C`` as that of ``core`` (carrying stride and dilation) and ``U_out``
as that of ``last`` (1x1, with the bias). The integrator (:mod:`tensorcut.train.tdlrt_optim`)
and the conversion (:mod:`tensorcut.train.tdlrt_convert`) go through these functions only.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import torch
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.layers.base import FactorizedConv2d

__all__ = [
    "TuckerView",
    "check_hparams",
    "dense_convs",
    "factors",
    "is_tucker_layer",
    "layer_sizes",
    "mode_bounds",
    "rank_report",
    "tucker_layers",
    "write_factors",
]


class TuckerView(nn.Module):
    """The static type of a layer that passes :func:`is_tucker_layer` (never instantiated):
    three convolutions, ``first`` (1x1, IN -> r_in), ``core`` (r_out x r_in x KH x KW) and
    ``last`` (1x1, r_out -> OUT)."""

    first: nn.Conv2d
    core: nn.Conv2d
    last: nn.Conv2d


def is_tucker_layer(m: nn.Module) -> TypeGuard[TuckerView]:
    """True for an ungrouped layer of a method the integrator trains (``tdlrt_trainable``: the
    ``first`` / ``core`` / ``last`` Tucker-2 structure).

    Grouped Tucker layers (block-diagonal factors) and full-Tucker layers are not trained by
    the integrator; they stay ordinary parameters of the base optimiser.

    Args:
        m: any module.

    Returns:
        Whether the integrator trains ``m`` (a type guard: ``m`` is a :class:`TuckerView`).

    Example:
        >>> from tensorcut.layers.tucker import TuckerConv2d
        >>> is_tucker_layer(TuckerConv2d.from_conv(nn.Conv2d(8, 8, 3), ranks=(4, 4)))
        True
    """
    return (
        getattr(type(m), "tdlrt_trainable", False) is True
        and getattr(getattr(m, "geometry", None), "groups", 1) == 1
        and all(isinstance(getattr(m, a, None), nn.Conv2d) for a in ("first", "core", "last"))
    )


def tucker_layers(model: nn.Module) -> dict[str, TuckerView]:
    """The layers of ``model`` the integrator trains, by name, in module order.

    Example:
        >>> list(tucker_layers(model))  # doctest: +SKIP
        ['layer1.0.conv2', ...]
    """
    return {name: m for name, m in model.named_modules() if is_tucker_layer(m)}


def factors(layer: TuckerView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factors of a Tucker layer: ``W = C x_1 U_out x_2 U_in``.

    Args:
        layer: a layer that passes :func:`is_tucker_layer`.

    Returns:
        ``(U_out (OUT, r_out), C (r_out, r_in, KH, KW), U_in (IN, r_in))``, detached views of
        the weights (writing into them changes the layer).

    Example:
        >>> U_out, C, U_in = factors(layer)  # doctest: +SKIP
    """
    U_out = layer.last.weight.detach()[:, :, 0, 0]
    U_in = layer.first.weight.detach()[:, :, 0, 0].mT
    return U_out, layer.core.weight.detach(), U_in


def _set_conv_weight(conv: nn.Conv2d, w: torch.Tensor) -> None:
    conv.weight.data = w.contiguous()
    conv.weight.grad = None
    conv.out_channels, conv.in_channels = int(w.shape[0]), int(w.shape[1])


def write_factors(
    layer: TuckerView, U_out: torch.Tensor, C: torch.Tensor, U_in: torch.Tensor
) -> None:
    """Store new factors, of any ranks, in the layer's three convolutions: the same Parameter
    objects with new data (and shapes), gradients cleared; cast to the layer's dtype.

    Args:
        layer: a layer that passes :func:`is_tucker_layer`.
        U_out, C, U_in: the factors, as :func:`factors` returns them.

    Example:
        >>> U_out, C, U_in = factors(layer)  # doctest: +SKIP
        >>> write_factors(layer, U_out[:, :2], C[:2], U_in)  # doctest: +SKIP
    """
    dt = layer.core.weight.dtype
    _set_conv_weight(layer.last, U_out.to(dt)[:, :, None, None])
    _set_conv_weight(layer.core, C.to(dt))
    _set_conv_weight(layer.first, U_in.mT.to(dt)[:, :, None, None])
    if hasattr(layer, "_ranks"):  # layers that cache their ranks (a plain attribute)
        vars(layer)["_ranks"] = (int(C.shape[0]), int(C.shape[1]))


def mode_bounds(n: int, rmin: int, rmax: int | None) -> tuple[int, int]:
    """The ranks a mode of size ``n`` may take: ``hi = min(rmax, n)``, ``lo = min(rmin, hi)``.

    Example:
        >>> mode_bounds(10, 2, 4)
        (2, 4)
    """
    hi = n if rmax is None else min(int(rmax), n)
    return min(int(rmin), hi), hi


def layer_sizes(layer: TuckerView) -> tuple[int, int]:
    """``(OUT, IN)``: the sizes of the two dynamic modes (output and input channels)."""
    return int(layer.last.weight.shape[0]), int(layer.first.weight.shape[1])


def dense_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The ``nn.Conv2d`` modules still dense, ``(name, conv)`` in module order, not counting the
    convolutions inside factorized layers.

    Example:
        >>> [n for n, _ in dense_convs(nn.Sequential(nn.Conv2d(3, 8, 3)))]
        ['0']
    """
    out: list[tuple[str, nn.Conv2d]] = []

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, FactorizedConv2d) or is_tucker_layer(child):
                continue
            if isinstance(child, nn.Conv2d):
                out.append((full, child))
            else:
                walk(child, full)

    walk(model, "")
    return out


def check_hparams(tau: float, rmin: int, rmax: int | None, lr: float) -> None:
    """Refuse TDLRT settings out of range, in one line naming the setting.

    Args:
        tau: relative truncation tolerance, in ``[0, 1)``.
        rmin, rmax: rank bounds per mode (``rmin >= 1``, ``rmax >= rmin`` or ``None``).
        lr: learning rate (``> 0``).

    Raises:
        TensorcutError: the first setting out of range.

    Example:
        >>> check_hparams(0.1, 2, None, 0.05)
    """
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and 0.0 <= tau < 1.0):
        raise TensorcutError(f"tau must be a relative tolerance in [0, 1); got {tau!r}")
    if int(rmin) < 1:
        raise TensorcutError(f"rmin must be >= 1; got {rmin}")
    if rmax is not None and int(rmax) < int(rmin):
        raise TensorcutError(f"rmax ({rmax}) must be >= rmin ({rmin})")
    if not lr > 0:
        raise TensorcutError(f"learning rate must be > 0; got {lr}")


def rank_report(model: nn.Module) -> dict[str, Any]:
    """Per-layer ranks and parameter counts, and conv-layer totals.

    ``conv_cr`` = dense conv parameters / stored conv parameters over all convolutions
    (dense ones count the same on both sides; biases included); ``conv_compression_pct`` =
    ``100 (1 - 1/conv_cr)``, the paper's "compression rate".

    Args:
        model: any model.

    Returns:
        ``{"layers": {name: {"ranks", "sizes", "params", "dense_params", "cr"}},
        "conv_dense_params", "conv_params", "conv_cr", "conv_compression_pct"}``.

    Example:
        >>> rank_report(model)["conv_compression_pct"]  # doctest: +SKIP
        71.3
    """
    layers: dict[str, Any] = {}
    dense_total, stored_total = 0, 0
    for name, m in model.named_modules():
        if is_tucker_layer(m):
            n_out, n_in = layer_sizes(m)
            kh, kw = m.core.weight.shape[2:]
            dense = n_out * n_in * kh * kw + (n_out if m.last.bias is not None else 0)
            stored = sum(p.numel() for p in m.parameters())
            layers[name] = {
                "ranks": [int(m.core.weight.shape[0]), int(m.core.weight.shape[1])],
                "sizes": [n_out, n_in],
                "params": stored,
                "dense_params": dense,
                "cr": dense / max(stored, 1),
            }
            dense_total += dense
            stored_total += stored
        elif isinstance(m, FactorizedConv2d):
            dense, stored = m.geometry.dense_params(), m.num_params()
            dense_total += dense
            stored_total += stored
    for _, conv in dense_convs(model):
        k = sum(p.numel() for p in conv.parameters())
        dense_total += k
        stored_total += k
    cr = dense_total / max(stored_total, 1)
    return {
        "layers": layers,
        "conv_dense_params": dense_total,
        "conv_params": stored_total,
        "conv_cr": cr,
        "conv_compression_pct": 100.0 * (1.0 - 1.0 / cr) if stored_total else 0.0,
    }
