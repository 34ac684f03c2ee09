"""Which convolutions a plan decides on: selection by filter or names, each resolved to the
convolution it computes (:mod:`tensorcut.compression.effective`), their inputs captured on one
forward pass (:mod:`tensorcut.compression.verify`) and a :class:`~tensorcut.compression._builder.
Builder` for each that can be factorized. Shared by :func:`tensorcut.compression.planner.plan`
and :func:`tensorcut.compression.measured.measure_layer_drops`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorcut.compression import cost
from tensorcut.compression._builder import Builder, dense_entry
from tensorcut.compression.config import CompressConfig, FilterFn, default_filter
from tensorcut.compression.effective import Resolved, resolve
from tensorcut.compression.plan import LayerPlan
from tensorcut.compression.verify import Capture, capture
from tensorcut.errors import TensorcutError
from tensorcut.layers import FactorizedConv2d

__all__ = ["Selection", "select_layers"]


def _calibration_args(
    model: nn.Module,
    input_shape: Sequence[int] | None,
    calibration: torch.Tensor | tuple[Any, ...] | None,
) -> tuple[tuple[Any, ...], list[int]]:
    """The positional arguments of the capture forward pass and the per-image input shape."""
    ref = next(iter(model.parameters()), None)
    kw: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    if ref is not None and ref.device.type == "meta":
        raise TensorcutError(
            "the model's parameters are on the 'meta' device (no values); load or materialise "
            "its weights (e.g. model.to_empty(device='cpu') then load a state_dict) before "
            "compressing"
        )
    if input_shape is not None:
        shape = tuple(input_shape)
        if len(shape) != 3 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape
        ):
            raise TensorcutError(
                "input_shape must be (C, H, W) of one image, three positive ints; got "
                f"{tuple(input_shape)!r}"
            )
    if calibration is None:
        if input_shape is None:
            first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
            c = first.in_channels if first is not None else 3
            input_shape = (c, 32, 32)
            warnings.warn(
                f"no input_shape or calibration batch given: assuming one {c}x32x32 image per "
                "sample; MAC counts and the checks of each swap depend on it, so pass "
                "input_shape=(C, H, W)",
                UserWarning,
                stacklevel=3,
            )
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, *input_shape, generator=gen)
        return (x.to(**kw) if kw else x,), [int(v) for v in input_shape]
    args = calibration if isinstance(calibration, tuple) else (calibration,)
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
        raise TensorcutError(
            "calibration must be an input batch (a tensor of shape (N, C, H, W), or a tuple of the "
            "forward's positional arguments whose first is such a tensor)"
        )
    first_t: torch.Tensor = args[0]
    if input_shape is not None and tuple(first_t.shape[1:]) != tuple(input_shape):
        raise TensorcutError(
            f"calibration batch has shape {tuple(first_t.shape)} but input_shape is "
            f"{tuple(input_shape)}; "
            f"give a batch of shape (N, {', '.join(map(str, input_shape))}) or drop input_shape"
        )

    def move(
        a: Any,
    ) -> Any:  # floating tensors take the model's dtype too; other tensors only its device
        if not isinstance(a, torch.Tensor) or not kw:
            return a
        return a.to(**kw) if a.is_floating_point() else a.to(kw["device"])

    moved = tuple(move(a) for a in args)
    return moved, [int(v) for v in first_t.shape[1:]]


def _conv_modules(model: nn.Module) -> tuple[dict[str, nn.Conv2d], dict[str, list[str]], int]:
    """Every distinct Conv2d outside factorized layers by its first name, the other names of each
    (shared modules), and how many factorized layers the model already holds."""
    inside: set[int] = set()
    factorized = 0
    for m in model.modules():
        if isinstance(m, FactorizedConv2d) or (
            bool(getattr(type(m), "method", None)) and hasattr(m, "ranks")
        ):
            factorized += 1
            inside.update(id(s) for s in m.modules() if s is not m)
    first: dict[int, str] = {}
    convs: dict[str, nn.Conv2d] = {}
    aliases: dict[str, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, nn.Conv2d) or id(m) in inside:
            continue
        if id(m) in first:
            aliases[first[id(m)]].append(n)
        else:
            first[id(m)] = n
            convs[n] = m
            aliases[n] = []
    return convs, aliases, factorized


@dataclass
class Selection:
    """The layers a plan decides on: names, modules, builders and the capture pass.

    ``chosen`` lists the selected convolutions by first name; ``builders`` holds the ones that can
    be factorized, ``entries`` the dense entries (with their reason) of the others.
    """

    chosen: list[str]
    convs: dict[str, nn.Conv2d]
    aliases: dict[str, list[str]]
    builders: dict[str, Builder]
    entries: dict[str, LayerPlan]
    capture: Capture
    cost: cost.ModelCost
    args: tuple[Any, ...]
    shape: list[int]


def select_layers(
    model: nn.Module,
    cfg: CompressConfig,
    filter_fn: FilterFn | None = None,
    *,
    layers: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    calibration: torch.Tensor | tuple[Any, ...] | None = None,
) -> Selection:
    """Select the convolutions to decide on, resolve each, capture their inputs on one pass.

    Args:
        model: the dense model.
        cfg: the config (its ``allow_custom_forward`` decides what resolves).
        filter_fn, layers, input_shape, calibration: as in :func:`plan`.

    Returns:
        The :class:`Selection`.

    Raises:
        TensorcutError: no conv layer, an unknown layer name, a filter that selects nothing, a bad
            calibration batch or input shape.

    Example:
        >>> sel = select_layers(model, CompressConfig(ratio=0.5), input_shape=(3, 32, 32))
        >>> sorted(sel.builders)  # doctest: +SKIP
    """
    convs, aliases, factorized = _conv_modules(model)
    if not convs:
        if factorized:
            raise TensorcutError(
                f"the model is already compressed ({factorized} factorized layers, no dense "
                "Conv2d left); compress the dense original, or tensorcut.decompress(model) first"
            )
        raise TensorcutError("the model has no Conv2d layers to compress")
    primary = {a: n for n, al in aliases.items() for a in (n, *al)}
    if layers is not None:
        unknown = [n for n in layers if n not in primary]
        if unknown:
            raise TensorcutError(
                f"unknown layer {unknown[0]!r}; conv layers are: {', '.join(convs)}"
            )
        chosen = list(dict.fromkeys(primary[n] for n in layers))
    else:
        f = filter_fn or default_filter
        chosen = [n for n, m in convs.items() if f(n, m) or any(f(a, m) for a in aliases[n])]
    if not chosen:
        raise TensorcutError(
            "the filter selected no conv layer; nothing to compress (the default skips stems with "
            "<= 3 input channels)"
        )
    args, shape = _calibration_args(model, input_shape, calibration)
    cap = capture(model, [convs[n] for n in chosen], args)
    mc = cost.model_cost(model, example=args)
    units = {id(u.module): u for u in mc.units}
    entries: dict[str, LayerPlan] = {}
    builders: dict[str, Builder] = {}
    for n in chosen:
        m = convs[n]
        r = resolve(m, allow_custom_forward=cfg.allow_custom_forward)
        kind = r.kind if isinstance(r, Resolved) else ""
        if isinstance(r, str):
            entries[n] = dense_entry(n, m, r, kind, units.get(id(m)))
        elif id(m) not in cap.sizes:
            entries[n] = dense_entry(
                n, m, "not called by forward on the calibration input; left dense", kind, None
            )
        else:
            builders[n] = Builder(n, r.conv, cfg, cap.sizes[id(m)])
            builders[n].kind = kind
    return Selection(chosen, convs, aliases, builders, entries, cap, mc, args, shape)
