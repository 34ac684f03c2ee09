"""``plan``: decide, per convolution, the method and ranks; the model is not changed.

Each selected module is resolved to the convolution it computes
(:mod:`tensorcut.compression.effective`),
its activations are captured on one forward pass (:mod:`tensorcut.compression.verify`) and every
proposed swap is checked on them; the one cost model (:mod:`tensorcut.compression.cost`) gives
parameters and MACs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tensorcut.compression import cost
from tensorcut.compression._builder import (
    Builder,
    decide_one,
    dense_entry,
    finalize,
    verify_entry,
    warn_poor,
)
from tensorcut.compression.budget import plan_budget
from tensorcut.compression.config import CompressConfig, FilterFn, default_filter
from tensorcut.compression.effective import Resolved, refuse_scripted, resolve
from tensorcut.compression.plan import LayerPlan, Plan
from tensorcut.compression.speed_plan import SpeedOptions, finish_speed_plan, plan_speed
from tensorcut.compression.verify import capture
from tensorcut.errors import TensorcutError
from tensorcut.layers import FactorizedConv2d

__all__ = ["plan"]


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


def plan(
    model: nn.Module,
    config: CompressConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    calibration: torch.Tensor | tuple[Any, ...] | None = None,
    sensitivity: dict[str, float] | None = None,
    layers: Sequence[str] | None = None,
    progress: bool = True,
    speed: SpeedOptions | None = None,
    **kwargs: Any,
) -> Plan:
    """Decide, per convolution, the method and ranks (the model is not modified).

    Each selected module is first resolved to the plain convolution it computes
    (:mod:`tensorcut.compression.effective`; unknown subclasses stay dense with their reason), and
    every
    proposed swap is checked on the layer's real input captured from one forward pass
    (:mod:`tensorcut.compression.verify`); the measured output error is recorded per layer.

    Args:
        model: any module with ``nn.Conv2d`` layers (timm and torchvision networks included).
        config: a :class:`CompressConfig`, or give its fields as keyword arguments.
        filter_fn: ``filter_fn(name, module) -> bool`` selects layers (default
        :func:`default_filter`).
        input_shape: (C, H, W) of one image, for MACs and the checks (default: from ``calibration``,
            else the first conv's channels at 32x32, with a warning).
        calibration: an input batch ``(N, C, H, W)`` (or a tuple of the forward's positional
            arguments) whose activations are captured to check every swap; default: two random
            images.
        sensitivity: layer name -> weight (e.g. accuracy drop per norm loss from the truncation
            study): under a budget, sensitive layers are compressed more mildly.
        layers: explicit layer names instead of ``filter_fn``.
        progress: show a progress bar (on a terminal).
        speed: how a ``target_speedup`` plan measures (threads, batch, cache, ...; default
            :class:`~tensorcut.compression.speed_plan.SpeedOptions`: the current threads, batch 1,
            the whole model verified against dense).

    Returns:
        A JSON-serialisable :class:`Plan`.

    Raises:
        TensorcutError: bad options, no conv layer, a filter that selects nothing, a calibration
            batch of the wrong shape, or a forward pass that fails on the given input.

    Example:
        >>> p = plan(model, method="tucker2", ratio=0.3, input_shape=(3, 32, 32))
        >>> print(p.table())
    """
    refuse_scripted(model)
    cfg = config or CompressConfig(**kwargs)
    if config is not None and kwargs:
        raise TensorcutError("give either a CompressConfig or keyword options, not both")
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
    if cfg.target_speedup is not None and sensitivity:
        raise TensorcutError(
            "sensitivity guides a budget's allocation, not a target_speedup plan; drop one of them"
        )
    if sensitivity and cfg.budget is None and cfg.target_speedup is None:
        raise TensorcutError(
            "sensitivity guides a budget's allocation; give a budget too (or drop sensitivity)"
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
    built: dict[str, nn.Module] = {}
    rule = cfg.rule
    todo = [n for n in chosen if n in builders]
    it = tqdm(todo, desc="plan", leave=False, disable=None if progress else True)
    speed_opts = speed or SpeedOptions()
    speed_record: dict[str, Any] | None = None
    if cfg.target_speedup is not None:
        got, built, speed_record = plan_speed(model, todo, builders, cfg, shape, speed_opts, it)
        entries.update(got)
    elif cfg.budget is None:
        for n in it:
            b = builders[n]
            e, layer = decide_one(n, b, b.hw, cfg, rule)
            entries[n] = finalize(e, b, layer, cfg, b.hw)
            if layer is not None and entries[n].status == "factorize":
                built[n] = layer
    else:
        fixed = {n: entries[n] for n in chosen if n in entries}
        got, built = plan_budget(todo, builders, cfg, sensitivity or {}, mc, it, fixed)
        entries.update(got)
    for n in chosen:
        e = entries[n]
        m = convs[n]
        e.aliases = list(aliases[n])
        e.params_before = cost.unit_params(m)
        u = units.get(id(m))
        if u is not None:
            e.macs_before, e.calls = u.macs, u.calls
        if n in builders:
            e.kind = builders[n].kind
        if e.status == "factorize" and n in built:
            verify_entry(e, builders[n], built[n], cap, m)
            if e.status != "factorize":
                built.pop(n)
        if sensitivity and n in sensitivity:
            e.sensitivity = float(sensitivity[n])
    warn_poor([entries[n] for n in chosen], rule.kind)
    p = Plan(
        config=cfg.to_dict(),
        layers=[entries[n] for n in chosen],
        input_shape=shape,
        model_params=mc.total_params,
        model_macs=mc.total_macs,
    )
    p._built = built
    p._reference = (args, cap.model_output)
    if speed_record is not None:  # after each swap's check: the whole model against dense
        finish_speed_plan(model, p, speed_record, speed_opts)
    return p
