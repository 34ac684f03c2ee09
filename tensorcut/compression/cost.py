"""The one cost model: parameters and multiply-accumulates (MACs) of every layer type.

``plan``, ``summarize`` / ``inspect``, the report and the benchmarks all count through this
module, so their figures agree by construction. A "cost unit" is a dense convolution (any
``nn.Conv2d`` subclass, its own extra parameters such as timm's ``gain`` or a QAT module's
BatchNorm included), a factorized convolution (counted by its method's closed form, never by
its sublayers), an ``nn.Linear`` or an ``SVDLinear``. MACs are per image and per call: a
module called twice in one forward pass costs twice.

Definitions: a dense convolution costs ``OUT * IN/groups * KH * KW * OH * OW`` MACs; a linear
layer ``IN * OUT`` per token; a factorized layer what its ``predicted_macs`` closed form says
for its ranks and input size (equal to the convolutions it executes; tested with
``torch.utils.flop_counter``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorcut.geometry import ConvGeometry, Pair
from tensorcut.layers.base import FactorizedConv2d

__all__ = [
    "UnitCost",
    "ModelCost",
    "conv_macs",
    "dense_conv_macs",
    "factorized_macs",
    "factorized_params",
    "is_unit",
    "model_cost",
    "unit_params",
]


def conv_macs(out_channels: int, in_per_group: int, kernel: Pair, out_hw: Pair) -> int:
    """MACs of one dense convolution per image: ``OUT * IN/groups * KH * KW * OH * OW``."""
    return (
        int(out_channels)
        * int(in_per_group)
        * int(kernel[0])
        * int(kernel[1])
        * int(out_hw[0])
        * int(out_hw[1])
    )


def dense_conv_macs(geom: ConvGeometry, hw: Pair) -> int:
    """MACs of the dense convolution with geometry ``geom`` for an input of size ``hw``."""
    return conv_macs(
        geom.out_channels, geom.in_channels // geom.groups, geom.kernel_size, geom.output_size(hw)
    )


def factorized_macs(
    cls: type[FactorizedConv2d], geom: ConvGeometry, ranks: Sequence[int], hw: Pair
) -> int:
    """MACs of a factorized layer of class ``cls`` at ``ranks`` (its closed form)."""
    return int(cls.predicted_macs(geom, tuple(int(r) for r in ranks), hw))


def factorized_params(cls: type[FactorizedConv2d], geom: ConvGeometry, ranks: Sequence[int]) -> int:
    """Stored parameters of a factorized layer of class ``cls`` at ``ranks`` (its closed form)."""
    return int(cls.predicted_params(geom, tuple(int(r) for r in ranks)))


def _is_svd_linear(m: nn.Module) -> bool:
    from tensorcut.layers.linear import SVDLinear

    return isinstance(m, SVDLinear)


def is_unit(m: nn.Module) -> bool:
    """True for the modules the cost model counts as one layer."""
    return isinstance(m, (FactorizedConv2d, nn.Conv2d, nn.Linear)) or _is_svd_linear(m)


def unit_params(m: nn.Module) -> int:
    """Parameters a cost unit holds (its sublayers and extra parameters included)."""
    return sum(p.numel() for p in m.parameters())


def _call_macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """MACs of one call of cost unit ``m`` per image, from its input and output."""
    batch = max(int(inp.shape[0]), 1) if inp.dim() > 1 else 1
    if isinstance(m, FactorizedConv2d):
        return factorized_macs(
            type(m), m.geometry, m.ranks, (int(inp.shape[-2]), int(inp.shape[-1]))
        )
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return conv_macs(
            m.out_channels,
            m.in_channels // m.groups,
            (kh, kw),
            (int(out.shape[-2]), int(out.shape[-1])),
        )
    if isinstance(m, nn.Linear):
        tokens = out.numel() // max(int(out.shape[-1]), 1) // batch
        return int(m.in_features) * int(m.out_features) * tokens
    if _is_svd_linear(m):
        tokens = out.numel() // max(int(out.shape[-1]), 1) // batch
        return int(m.macs()) * tokens  # type: ignore[operator]
    raise TypeError(f"not a cost unit: {type(m).__name__}")


@dataclass
class UnitCost:
    """Cost of one layer: parameters, MACs per image (all calls), and how often forward ran it."""

    name: str
    module: nn.Module = field(repr=False)
    params: int
    macs: int = 0
    calls: int = 0


@dataclass
class ModelCost:
    """Every cost unit of a model (in module order) and the model's totals."""

    units: list[UnitCost]
    total_params: int
    input_shape: tuple[int, ...]

    @property
    def total_macs(self) -> int:
        """MACs per image of all cost units (convolutions and linear layers)."""
        return sum(u.macs for u in self.units)


def model_cost(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    example: torch.Tensor | tuple[Any, ...] | None = None,
) -> ModelCost:
    """Count parameters and per-image MACs of every cost unit by running one forward pass.

    Args:
        model: any module.
        input_shape: (C, H, W) of one image; a zero image of that shape is run (batch 1).
        example: instead of ``input_shape``, an input batch (a tensor, or a tuple of positional
            arguments) to run; MACs are divided by its batch size.

    Returns:
        :class:`ModelCost` (units nested in a factorized layer are not counted separately;
        shared modules are counted once per call, their parameters once).

    Raises:
        ValueError: neither ``input_shape`` nor ``example`` is given.

    Example:
        >>> c = model_cost(nn.Sequential(nn.Conv2d(3, 8, 3)), (3, 8, 8))
        >>> c.total_macs == 8 * 3 * 9 * 6 * 6
        True
    """
    if example is None and input_shape is None:
        raise ValueError("give input_shape or example")
    units: dict[int, UnitCost] = {}
    order: list[int] = []
    inner: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in inner or not is_unit(m):
            continue
        if isinstance(m, FactorizedConv2d) or _is_svd_linear(m):
            inner.update(id(s) for s in m.modules() if s is not m)
        units[id(m)] = UnitCost(name, m, unit_params(m))
        order.append(id(m))

    def hook(m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        u = units.get(id(m))
        if (
            u is None
            or not inp
            or not isinstance(inp[0], torch.Tensor)
            or not isinstance(out, torch.Tensor)
        ):
            return
        u.macs += _call_macs(m, inp[0], out)
        u.calls += 1

    handles = [units[i].module.register_forward_hook(hook) for i in order]
    was_training = model.training
    model.eval()
    try:
        ref = next(iter(model.parameters()), None)
        kw: dict[str, Any] = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {}
        with torch.no_grad():
            if example is None:
                assert input_shape is not None  # checked above
                args: tuple[Any, ...] = (torch.zeros((1, *input_shape), **kw),)
            else:
                args = example if isinstance(example, tuple) else (example,)
            model(*args)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    first = args[0]
    shape = (
        tuple(int(s) for s in first.shape[1:])
        if isinstance(first, torch.Tensor)
        else tuple(input_shape or ())
    )
    total = sum(p.numel() for p in model.parameters())
    return ModelCost([units[i] for i in order], total, shape)
