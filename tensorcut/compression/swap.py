"""The swap and its inverse: ``apply`` a plan, ``compress`` (plan + apply + one whole-model
check), ``decompress`` (every factorized layer back to a dense convolution)."""

from __future__ import annotations

import copy
import warnings
from typing import Any, cast

import torch
from torch import nn

from tensorcut.compression.config import CompressConfig, FilterFn
from tensorcut.compression.effective import resolve
from tensorcut.compression.plan import LayerPlan, Plan
from tensorcut.compression.planner import plan
from tensorcut.compression.verify import relative_difference
from tensorcut.errors import TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.layers import FactorizedConv2d, get_method, list_methods

__all__ = ["apply", "compress", "decompress"]


def _layer_for(e: LayerPlan, module: nn.Module, plan: Plan, allow_custom: bool) -> nn.Module:
    """The factorized layer for plan entry ``e``: the one ``plan`` built and checked, or rebuilt
    from the module's effective kernel at the recorded ranks."""
    layer = plan._built.get(e.name)
    if layer is not None and list(layer.ranks) == e.ranks:  # type: ignore[arg-type]
        layer = copy.deepcopy(layer)  # a plan may be applied to several models; never share modules
    else:
        r = resolve(module, allow_custom_forward=allow_custom)
        if isinstance(r, str):
            raise TensorcutError(f"plan layer {e.name!r} cannot be factorized in this model: {r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = get_method(e.method).from_conv(r.conv, ranks=tuple(e.ranks), **e.options)
    w = cast(torch.Tensor, module.weight)
    layer = layer.to(device=w.device, dtype=w.dtype)
    if not w.requires_grad:  # a frozen conv stays frozen
        layer.requires_grad_(False)
    return layer


def apply(model: nn.Module, plan: Plan) -> nn.Module:
    """Swap the planned convolutions for factorized layers, in place.

    Args:
        model: the model the plan was made for (or one of the same architecture).
        plan: a :class:`Plan` from :func:`plan` (or :meth:`Plan.load`).

    Returns:
        ``model``, with every ``factorize`` entry replaced under all its names (shared modules
        stay shared).

    Raises:
        TensorcutError: a planned layer is missing, not a Conv2d (already compressed?), has another
            geometry, or names an unknown method — checked for every layer before anything changes.

    Example:
        >>> p = plan(model, ratio=0.5, input_shape=(3, 32, 32))
        >>> apply(model, p)
    """
    allow_custom = (
        bool(plan.config.get("allow_custom_forward", False))
        if isinstance(plan.config, dict)
        else False
    )
    todo = []
    for e in plan.layers:
        if e.status != "factorize":
            continue
        try:
            conv = model.get_submodule(e.name)
        except AttributeError:
            raise TensorcutError(
                f"plan names layer {e.name!r}, which this model does not have; make the plan for "
                "this model"
            ) from None
        if not isinstance(conv, nn.Conv2d):
            raise TensorcutError(
                f"plan layer {e.name!r} is a {type(conv).__name__} in this model, not a Conv2d "
                "(already compressed?)"
            )
        r = resolve(conv, allow_custom_forward=allow_custom)
        geom = (
            ConvGeometry.from_conv(r.conv)
            if not isinstance(r, str)
            else ConvGeometry.from_conv(conv)
        )
        if geom.to_dict() != e.geometry:
            raise TensorcutError(
                f"plan does not match model at {e.name!r}: planned geometry {e.geometry} differs "
                "from the layer's"
            )
        if e.method not in list_methods():
            raise TensorcutError(
                f"plan layer {e.name!r} uses unknown method {e.method!r}; "
                f"known: {', '.join(list_methods())}"
            )
        for a in e.aliases:
            try:
                other = model.get_submodule(a)
            except AttributeError:
                raise TensorcutError(
                    f"plan names layer {a!r} (a second name of {e.name!r}), which this model does "
                    "not have"
                ) from None
            if other is not conv:
                raise TensorcutError(
                    f"plan says {a!r} and {e.name!r} are one shared module, but in this model "
                    "they are not"
                )
        layer = _layer_for(e, conv, plan, allow_custom)
        got = sum(q.numel() for q in layer.parameters())
        if got != e.params_after:
            raise TensorcutError(
                f"plan layer {e.name!r} records {e.params_after:,} parameters at ranks "
                f"{tuple(e.ranks)} but a "
                f"{e.method} layer with those ranks holds {got:,} (ranks beyond what the kernel "
                "admits "
                "are clamped); the plan was edited or made for another model"
            )
        todo.append((e, layer))
    for e, layer in todo:
        for n in (e.name, *e.aliases):
            model.set_submodule(n, layer)
    return model


def compress(
    model: nn.Module,
    config: CompressConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    from_scratch: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, Plan]:
    """``plan`` then ``apply``, then one check of the whole compressed model.

    Args:
        model: the model to compress (modified in place).
        config: a :class:`CompressConfig`, or its fields as keyword arguments.
        filter_fn: selects layers, as in :func:`plan`.
        from_scratch: re-initialise the factorized layers randomly (the thesis's "tensorize, then
            train from scratch"); otherwise the factors come from the pretrained kernels.
        **kwargs: ``input_shape``, ``calibration``, ``sensitivity``, ``layers``, ``progress``,
            ``speed`` (see :func:`plan`) and :class:`CompressConfig` fields.

    Returns:
        ``(model, plan)``; ``plan.model_output_error`` holds the compressed model's
        relative output error on the calibration batch (before any re-initialisation).

    Raises:
        TensorcutError: as :func:`plan` and :func:`apply`; and when the compressed model's forward
            fails, after restoring every original module (the model is left as it was).

    Example:
        >>> model, p = compress(model, method="tucker2", ratio=0.3, input_shape=(3, 32, 32))
    """
    plan_kw = {
        k: kwargs.pop(k)
        for k in ("input_shape", "calibration", "sensitivity", "layers", "progress", "speed")
        if k in kwargs
    }
    p = plan(model, config, filter_fn, **plan_kw, **kwargs)
    originals = {
        n: model.get_submodule(n)
        for e in p.layers
        if e.status == "factorize"
        for n in (e.name, *e.aliases)
    }
    assert p._reference is not None  # set by plan
    args, ref = p._reference
    was_training = model.training
    model.eval()
    try:
        apply(model, p)
        with torch.no_grad():
            out = model(*args)
    except (
        Exception
    ) as e:  # the user's forward on the swapped model: restore, then report in one line
        for n, m in originals.items():
            model.set_submodule(n, m)
        model.train(was_training)
        if isinstance(e, TensorcutError):
            raise
        first = (str(e).splitlines() or [""])[0][:200]
        raise TensorcutError(
            f"the compressed model's forward failed ({type(e).__name__}: {first}); the original "
            "modules "
            "were restored. Please report this model; compress fewer layers (layers=... or "
            "filter_fn) meanwhile"
        ) from None
    model.train(was_training)
    if isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor) and ref.shape == out.shape:
        p.model_output_error = relative_difference(out, ref)
    if from_scratch:
        for m in model.modules():
            if isinstance(m, FactorizedConv2d):
                m.reset_parameters()
    return model, p


def decompress(model: nn.Module) -> nn.Module:
    """The inverse of :func:`apply`: every factorized convolution back to a dense one, in place.

    Args:
        model: a model holding factorized layers (any registered method).

    Returns:
        ``model`` with each factorized layer replaced by the ``nn.Conv2d`` (a :class:`SameConv2d`
        for TF-same padding) that computes its reconstructed kernel, under all its names.
        A model without factorized layers is returned unchanged.

    Raises:
        Nothing of its own: each layer's :meth:`FactorizedConv2d.to_conv` rebuilds its kernel
        from factors it already holds.

    Example:
        >>> dense = decompress(compressed_model)
    """
    done: dict[int, nn.Module] = {}
    for n, m in list(model.named_modules(remove_duplicate=False)):
        if isinstance(m, FactorizedConv2d):
            if id(m) not in done:
                conv = m.to_conv()
                conv.requires_grad_(any(p.requires_grad for p in m.parameters()))
                done[id(m)] = conv
            model.set_submodule(n, done[id(m)])
    return model
