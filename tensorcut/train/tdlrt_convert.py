"""Conversion for TDLRT: dense convolutions to Tucker-2 layers with orthonormal factors at the
requested starting ranks (:func:`tuckerize`), through the package's one conv swap.

:func:`tdlrt_plan` decides, like :func:`tensorcut.compression.plan` but without a calibration
pass: which convolutions (the compression's eligibility rule,
:func:`tensorcut.compression.default_filter`, unless ``filter`` is given; ungrouped; the model's
first convolution left out with ``skip_first``), at which ranks (per layer, from ``init_rank``,
within ``[rmin, min(rmax, n)]`` and the kernel's useful ranks), decomposed by truncated HOSVD.
:func:`tensorcut.compression.apply` swaps them. :func:`tuckerize` then does what only TDLRT
needs: ranks the kernel cannot fill are padded exactly (orthonormal directions, zero core), a
fresh start replaces the factors by random orthonormal ones, and Tucker layers already in the
model are orthonormalised exactly and brought into the rank bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from tensorcut.compression import LayerPlan, Plan, apply, default_filter
from tensorcut.compression.effective import resolve
from tensorcut.errors import TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.layers.tucker import TuckerConv2d, TuckerOptions
from tensorcut.train.tdlrt_layers import (
    TuckerView,
    check_hparams,
    dense_convs,
    factors,
    is_tucker_layer,
    layer_sizes,
    mode_bounds,
    tucker_layers,
    write_factors,
)
from tensorcut.train.tdlrt_ops import augment_basis, galerkin_core, mode_spectrum

__all__ = ["ConvFilter", "RankArg", "tdlrt_plan", "tuckerize"]

ConvFilter = Callable[[str, nn.Conv2d], bool]
RankArg = int | tuple[int, int] | Mapping[str, int | tuple[int, int]] | None

#: the layer the integrator trains (first / core / last) and how it starts: truncated HOSVD of the
#: kernel, without HOOI refinement (the integrator's own truncation is HOSVD too)
LAYER = TuckerConv2d
START = TuckerOptions(hooi=False)


def _candidates(
    model: nn.Module, filter: ConvFilter | None, skip_first: bool
) -> list[tuple[str, nn.Conv2d, list[str]]]:
    """``(name, conv, other names)`` of every dense convolution to convert, in module order.

    A shared module is one entry under its first name; it is selected when the filter accepts
    any of its names.
    """
    convs = dense_convs(model)
    first = convs[0][1] if convs else None
    entries: dict[int, tuple[str, nn.Conv2d, list[str]]] = {}
    for name, conv in convs:
        if id(conv) in entries:
            entries[id(conv)][2].append(name)
        else:
            entries[id(conv)] = (name, conv, [])
    accept = filter if filter is not None else default_filter
    return [
        (name, conv, aliases)
        for name, conv, aliases in entries.values()
        if conv.groups == 1
        and not (skip_first and conv is first)
        and any(accept(n, conv) for n in (name, *aliases))
    ]


def tdlrt_plan(
    model: nn.Module,
    init_rank: RankArg = None,
    *,
    from_pretrained: bool = True,
    rmin: int = 2,
    rmax: int | None = None,
    filter: ConvFilter | None = None,
    skip_first: bool = True,
) -> Plan:
    """The swap :func:`tuckerize` makes, as a :class:`~tensorcut.compression.Plan` for
    :func:`tensorcut.compression.apply` (the model is not changed).

    One ``factorize`` entry per selected convolution, method ``tucker2``, ranks the starting
    ranks clipped to what the kernel admits (:func:`tuckerize` pads the rest), decomposition by
    truncated HOSVD. Nothing is measured: MACs, errors and input sizes are left empty.
    Convolutions whose computation tensorcut cannot reproduce
    (:func:`tensorcut.compression.effective.resolve`) are left out.

    Args:
        model: the model to convert.
        init_rank, from_pretrained, rmin, rmax, filter, skip_first: as for :func:`tuckerize`.

    Returns:
        The plan, entries in module order.

    Raises:
        TensorcutError: bad rank bounds or ``init_rank``.

    Example:
        >>> p = tdlrt_plan(model, init_rank=8)
        >>> print([(e.name, e.ranks) for e in p.layers])  # doctest: +SKIP
    """
    check_hparams(0.0, rmin, rmax, 1.0)
    with torch.random.fork_rng(devices=_cuda_devices(model)):  # resolve() builds modules
        found = [
            (n, resolve(c), aliases) for n, c, aliases in _candidates(model, filter, skip_first)
        ]
    entries = []
    for name, r, aliases in found:
        if isinstance(r, str):
            continue
        geom = ConvGeometry.from_conv(r.conv)
        targets = _target_ranks(
            (geom.out_channels, geom.in_channels),
            _layer_rank(init_rank, name),
            rmin,
            rmax,
            default_half=not from_pretrained,
        )
        ranks = [min(t, m) for t, m in zip(targets, LAYER.max_ranks(geom), strict=True)]
        entries.append(
            LayerPlan(
                name=name,
                method=LAYER.method,
                status="factorize",
                reason="",
                ranks=ranks,
                params_before=geom.dense_params(),
                params_after=LAYER.predicted_params(geom, ranks),
                macs_before=0,
                macs_after=0,
                error=None,
                geometry=geom.to_dict(),
                input_hw=[],
                note="TDLRT start" + ("" if from_pretrained else ", factors then drawn at random"),
                options=START.kwargs(),
                kind=r.kind,
                aliases=aliases,
            )
        )
    return Plan(
        config={"method": LAYER.method, "rank": "per layer (TDLRT start)"},
        layers=entries,
        input_shape=[],
        model_params=sum(p.numel() for p in model.parameters()),
        model_macs=0,
    )


def _layer_rank(init_rank: RankArg, name: str) -> int | tuple[int, int] | None:
    """The ``init_rank`` entry for layer ``name`` (a mapping gives per-layer values; absent =
    default)."""
    if isinstance(init_rank, Mapping):
        r = init_rank.get(name)
        return None if r is None else (r if isinstance(r, int) else (int(r[0]), int(r[1])))
    return init_rank


def _target_ranks(
    sizes: tuple[int, int],
    init_rank: int | tuple[int, int] | None,
    rmin: int,
    rmax: int | None,
    default_half: bool,
) -> tuple[int, int]:
    if init_rank is None:
        req: tuple[int | None, int | None] = (None, None)
    elif isinstance(init_rank, int):
        req = (init_rank, init_rank)
    else:
        t = tuple(init_rank)
        if len(t) != 2:
            raise TensorcutError(f"init_rank is an int or a pair (r_out, r_in); got {init_rank!r}")
        req = (int(t[0]), int(t[1]))
    out = []
    for n, r in zip(sizes, req, strict=True):
        lo, hi = mode_bounds(n, rmin, rmax)
        if r is None:
            r = math.ceil(n / 2) if default_half else hi
        if r < 1:
            raise TensorcutError(f"init_rank must be >= 1; got {init_rank!r}")
        out.append(max(lo, min(int(r), hi)))
    return out[0], out[1]


def _random_orthonormal(n: int, r: int, like: torch.Tensor) -> torch.Tensor:
    Q = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64)).Q
    return Q.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def _normalise_tucker(layer: TuckerView, targets: tuple[int, int]) -> None:
    """Make an existing Tucker layer's factors orthonormal and bring its ranks to ``targets``.

    Orthonormalisation is exact (``U = Q R``, ``C <- C x R``); lower targets truncate the core by
    HOSVD, higher ones pad with random orthonormal directions and a zero core block (exact).
    """
    U_out, C, U_in = factors(layer)
    Us, maps = [], []
    for mode, U in ((0, U_out), (1, U_in)):
        Q, R = torch.linalg.qr(U.double())
        Us.append(Q)
        maps.append((mode, R))
    Cd = galerkin_core(C.double(), maps)
    maps = []
    for mode, t in enumerate(targets):
        U = Us[mode]
        n, r = U.shape
        if t < r:
            P = mode_spectrum(Cd, mode)[0][:, :t]
            Us[mode] = U @ P
            maps.append((mode, P.mT))
        elif t > r:
            fill = augment_basis(U, torch.randn(n, t - r, dtype=U.dtype), t)
            Us[mode] = fill
            maps.append((mode, fill.mT @ U))
    Cd = galerkin_core(Cd, maps)
    write_factors(layer, Us[0], Cd, Us[1])


@torch.no_grad()
def tuckerize(
    model: nn.Module,
    init_rank: RankArg = None,
    *,
    from_pretrained: bool = True,
    rmin: int = 2,
    rmax: int | None = None,
    filter: ConvFilter | None = None,
    skip_first: bool = True,
) -> nn.Module:
    """Convert ``model``'s convolutions to Tucker-2 layers ready for TDLRT, in place; returns
    ``model``.

    ``from_pretrained=True``: each kernel is decomposed by HOSVD (channel modes), keeping its
    function exactly at full rank; ``init_rank`` (int, ``(r_out, r_in)``, or a mapping from
    layer name to either, e.g. the final ranks of another run) truncates, default
    ``min(n_i, rmax)`` (lossless unless ``rmax`` is smaller). ``from_pretrained=False``: a fresh
    start, random orthonormal factors and a Gaussian core scaled to the norm of the layer's
    default initialisation, ranks ``init_rank`` or ``ceil(n_i / 2)`` by default (the reference
    code's choice, so the first augmentation can reach full rank). Ranks are clipped to
    ``[rmin, min(rmax, n_i)]``.

    Converted: the convolutions :func:`tensorcut.compression.default_filter` selects (every
    ``nn.Conv2d`` but stems with <= 3 input channels), or ``filter(name, conv)`` when given,
    ungrouped, except the model's first convolution (``skip_first``: also when it has more
    than 3 input channels), swapped by :func:`tensorcut.compression.apply` with the plan of
    :func:`tdlrt_plan`. Tucker layers already present (a Tucker-compressed model) are kept,
    their factors orthonormalised exactly and their ranks brought into the bounds (and to
    ``init_rank`` when it is given).

    Args:
        model: the model, changed in place.
        init_rank: starting ranks (see above).
        from_pretrained: decompose the kernels (``True``) or start at random.
        rmin, rmax: rank bounds per mode.
        filter: ``filter(name, conv) -> bool`` selects the convolutions (default
            :func:`~tensorcut.compression.default_filter`).
        skip_first: leave the model's first convolution dense.

    Returns:
        ``model``.

    Raises:
        TensorcutError: not a module, bad rank bounds or ``init_rank``.

    Example:
        >>> from tensorcut.train.tdlrt import tuckerize
        >>> tuckerize(model, init_rank=16)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TensorcutError(f"tuckerize needs an nn.Module; got {type(model).__name__}")
    existing = tucker_layers(model)
    plan = tdlrt_plan(
        model,
        init_rank,
        from_pretrained=from_pretrained,
        rmin=rmin,
        rmax=rmax,
        filter=filter,
        skip_first=skip_first,
    )
    dense = {c.name: conv for c, conv in zip(plan.layers, _convs(model, plan), strict=True)}
    with torch.random.fork_rng(devices=_cuda_devices(model)):  # building layers draws no start
        apply(model, plan)
    for e in plan.layers:
        conv, layer = dense[e.name], model.get_submodule(e.name)
        if not is_tucker_layer(layer):  # pragma: no cover - LAYER is a Tucker-2 layer
            raise TensorcutError(f"{type(layer).__name__} is not a first / core / last layer")
        layer.train(conv.training)
        targets = _target_ranks(
            layer_sizes(layer),
            _layer_rank(init_rank, e.name),
            rmin,
            rmax,
            default_half=not from_pretrained,
        )
        if not from_pretrained:
            _random_start(layer, targets, conv)
        elif tuple(e.ranks) != targets:  # the kernel admits fewer: pad exactly
            _normalise_tucker(layer, targets)
    for name, layer in existing.items():  # still in the model: only dense convs were replaced
        U_out, C, U_in = factors(layer)
        sizes = layer_sizes(layer)
        wanted = _layer_rank(init_rank, name)
        if wanted is None:
            t_out, t_in = (
                max(lo, min(int(r), hi))
                for r, (lo, hi) in zip(
                    C.shape[:2], (mode_bounds(n, rmin, rmax) for n in sizes), strict=True
                )
            )
        else:
            t_out, t_in = _target_ranks(sizes, wanted, rmin, rmax, default_half=False)
        _normalise_tucker(layer, (int(t_out), int(t_in)))
    return model


def _cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices holding ``model``'s parameters (their RNG is forked with the CPU's)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})


def _convs(model: nn.Module, plan: Plan) -> list[nn.Conv2d]:
    """The convolutions ``plan`` replaces, before the swap."""
    out = []
    for e in plan.layers:
        conv = model.get_submodule(e.name)
        assert isinstance(conv, nn.Conv2d)  # tdlrt_plan lists convolutions only
        out.append(conv)
    return out


def _random_start(layer: TuckerView, ranks: tuple[int, int], conv: nn.Conv2d) -> None:
    """Random orthonormal factors and a Gaussian core with the norm of ``conv``'s kernel (the
    default initialisation's scale), at ``ranks``."""
    W = conv.weight.detach()
    r_out, r_in = ranks
    n_out, n_in = layer_sizes(layer)
    U_out = _random_orthonormal(n_out, r_out, W)
    U_in = _random_orthonormal(n_in, r_in, W)
    C = torch.randn(r_out, r_in, *W.shape[2:], dtype=W.dtype, device=W.device)
    C *= torch.linalg.vector_norm(W) / torch.linalg.vector_norm(C).clamp_min(1e-30)
    write_factors(layer, U_out, C, U_in)
