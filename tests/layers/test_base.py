"""The factorized-layer contract (``layers/base.py``), parametrised over LAYER_REGISTRY: a new
method is covered automatically (as timm tests every registered model).

At full rank (each class's ``max_ranks``) every layer must compute exactly what the dense
``nn.Conv2d`` computes across kernel sizes, strides, paddings, dilations, padding modes,
bias and groups; its counts must match the closed forms; and it must survive ``to_conv`` and
a ``config`` + ``state_dict`` round trip. Every method declares a typed ``Options`` dataclass.
Method-specific tests live in ``test_layers_<method>.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import tensorcut.layers  # noqa: F401  (registers every layer class)
from tensorcut.errors import TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.layers import CPConv2d, TTConv2d, TuckerConv2d
from tensorcut.layers.base import LAYER_REGISTRY, FactorizedConv2d, MethodOptions

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py

METHODS = sorted(LAYER_REGISTRY)
HW = (11, 10)

AXES: dict[str, list[Any]] = {
    "kernel_size": [1, 3, 5, (3, 1), (1, 3), (2, 3)],
    "stride": [(1, 1), (2, 1), (2, 2)],
    "padding": [0, 1, (1, 2), "same", "valid"],
    "dilation": [1, 2],
    "padding_mode": ["zeros", "reflect", "replicate", "circular"],
    "bias": [True, False],
    "groups": [1, 1, 2],
}


def _grid(n_random: int = 34, seed: int = 20240) -> list[dict[str, Any]]:
    """Every axis value at least once (a diagonal sweep), plus a fixed pseudo-random sample."""
    rng = random.Random(seed)
    combos = []
    longest = max(len(v) for v in AXES.values())
    for i in range(longest):
        combos.append({k: v[i % len(v)] for k, v in AXES.items()})
    for _ in range(n_random):
        combos.append({k: rng.choice(v) for k, v in AXES.items()})
    out = []
    for c in combos:
        if c["padding"] == "same":  # PyTorch refuses 'same' with strides
            c["stride"] = (1, 1)
        out.append(c)
    return out


GRID = _grid()


def _id(c: dict[str, Any]) -> str:
    fmt = "k{kernel_size}-s{stride}-p{padding}-d{dilation}-{padding_mode}-b{bias:d}-g{groups}"
    return fmt.format(**c).replace(" ", "")


def _conv(
    c: dict[str, Any],
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    cin: int = 4,
    cout: int = 6,
) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, **c).to(dtype)
    with torch.no_grad():
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


def _input(cin: int = 4, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, cin, *HW, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _from_conv_full(cls: type[FactorizedConv2d], conv: nn.Conv2d) -> FactorizedConv2d | None:
    """``from_conv`` at ``max_ranks``; None when the class refuses grouped convs with a reason."""
    try:
        return cls.from_conv(conv, cls.max_ranks(ConvGeometry.from_conv(conv)))  # type: ignore[attr-defined]
    except TensorcutError as e:
        if conv.groups > 1 and "groups" in str(e):
            return None
        raise


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_grid_covers_every_axis_value() -> None:
    for k, values in AXES.items():
        for v in values:
            assert any(c[k] == v for c in GRID), (k, v)
    assert 35 <= len(GRID) <= 45


@pytest.mark.parametrize("combo", GRID, ids=_id)
@pytest.mark.parametrize("method", METHODS)
def test_full_rank_matches_dense(method: str, combo: dict[str, Any]) -> None:
    cls = LAYER_REGISTRY[method]
    conv = _conv(combo)
    layer = _from_conv_full(cls, conv)
    if layer is None:
        return
    geom = ConvGeometry.from_conv(conv)
    x = _input()
    ref = conv(x)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    # counts: stored == predicted (closed form), traced MACs == predicted MACs
    n_params = sum(p.numel() for p in layer.parameters())
    assert layer.num_params() == n_params == cls.predicted_params(geom, layer.ranks)  # type: ignore[attr-defined]
    assert layer.macs(HW) == cls.predicted_macs(geom, layer.ranks, HW)  # type: ignore[attr-defined]

    # dense round trip
    dense = layer.to_conv()
    assert isinstance(dense, nn.Conv2d) and ConvGeometry.from_conv(dense) == geom
    torch.testing.assert_close(dense(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.reconstruct_weight(), conv.weight, atol=1e-6, rtol=1e-6)

    # checkpoint round trip: JSON config -> new instance -> state_dict -> identical outputs
    cfg = json.loads(json.dumps(layer.config()))
    assert cfg["method"] == method
    rebuilt = cls.from_config(cfg).to(torch.float64)
    rebuilt.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)
    assert tuple(rebuilt.ranks) == tuple(layer.ranks)


@pytest.mark.parametrize("method", METHODS)
def test_float32_full_rank(method: str) -> None:
    cls = LAYER_REGISTRY[method]
    combo = {
        "kernel_size": 3,
        "stride": (1, 1),
        "padding": 1,
        "dilation": 1,
        "padding_mode": "zeros",
        "bias": True,
        "groups": 1,
    }
    conv = _conv(combo, dtype=torch.float32, cin=5, cout=7)
    layer = _from_conv_full(cls, conv)
    assert layer is not None
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    x = _input(cin=5, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), atol=1e-4, rtol=1e-4)


GEOMS = [
    ConvGeometry(8, 6, (3, 3), padding=(1, 1)),
    ConvGeometry(6, 10, (1, 1), stride=(2, 2), bias=False),
    ConvGeometry(
        4, 4, (2, 3), stride=(2, 1), padding="valid", dilation=(2, 1), padding_mode="reflect"
    ),
    ConvGeometry(8, 6, (3, 3), padding="same", groups=2, padding_mode="circular"),
]


@pytest.mark.parametrize(
    "geom", GEOMS, ids=lambda g: f"{g.in_channels}-{g.out_channels}-{g.kernel_size}-g{g.groups}"
)
@pytest.mark.parametrize("method", METHODS)
def test_counts_match_closed_forms_at_partial_rank(method: str, geom: ConvGeometry) -> None:
    cls = LAYER_REGISTRY[method]
    try:
        ranks = tuple(max(1, m // 2) for m in cls.max_ranks(geom))  # type: ignore[attr-defined]
        layer = cls(geom, ranks).to(torch.float64)
    except TensorcutError as e:
        assert geom.groups > 1 and "groups" in str(e)
        return
    assert tuple(layer.ranks) == ranks
    assert layer.num_params() == cls.predicted_params(geom, ranks)  # type: ignore[attr-defined]
    assert layer.macs(HW) == cls.predicted_macs(geom, ranks, HW)  # type: ignore[attr-defined]
    out = layer(torch.zeros(1, geom.in_channels, *HW, dtype=torch.float64))
    assert out.shape[2:] == geom.output_size(HW)


@pytest.mark.parametrize("method", METHODS)
def test_error_non_increasing_in_rank(method: str) -> None:
    cls = LAYER_REGISTRY[method]
    conv = nn.Conv2d(6, 8, 3, padding=1).double()
    torch.manual_seed(3)
    geom = ConvGeometry.from_conv(conv)
    maxr = cls.max_ranks(geom)  # type: ignore[attr-defined]
    errs = []
    for f in (0.2, 0.45, 0.7, 1.0):
        ranks = tuple(max(1, math.ceil(f * m)) for m in maxr)
        layer = cls.from_conv(conv, ranks)  # type: ignore[attr-defined]
        errs.append(_rel(layer.reconstruct_weight().detach(), conv.weight.detach()))
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-10 and errs[0] > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_rank_zero_raises(method: str) -> None:
    cls = LAYER_REGISTRY[method]
    conv = nn.Conv2d(4, 6, 3)
    n = len(cls.max_ranks(ConvGeometry.from_conv(conv)))  # type: ignore[attr-defined]
    with pytest.raises(TensorcutError):
        cls.from_conv(conv, (0,) * n)  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", ["cp", "tt", "tucker", "tucker2"])
def test_rank_zero_message_names_valid_range(method: str) -> None:
    cls = LAYER_REGISTRY[method]
    conv = nn.Conv2d(4, 6, 3)
    maxr = cls.max_ranks(ConvGeometry.from_conv(conv))  # type: ignore[attr-defined]
    with pytest.raises(TensorcutError, match=rf"\[1, {maxr[0]}\]"):
        cls.from_conv(conv, (0,) + tuple(maxr[1:]))  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", METHODS)
def test_clamping_warns_and_reports(method: str) -> None:
    cls = LAYER_REGISTRY[method]
    conv = nn.Conv2d(4, 6, 3).double()
    maxr = tuple(cls.max_ranks(ConvGeometry.from_conv(conv)))  # type: ignore[attr-defined]
    asked = tuple(m + 5 for m in maxr)
    with pytest.warns(UserWarning) as record:
        layer = cls.from_conv(conv, asked)  # type: ignore[attr-defined]
    text = " ".join(str(w.message) for w in record)
    assert str(asked[0]) in text  # the warning names the requested value ...
    got = tuple(layer.ranks)
    assert all(g <= a for g, a in zip(got, asked, strict=True)) and any(
        str(g) in text for g in got
    )  # ... and the clamped one
    if method in ("cp", "tt", "tucker", "tucker2"):  # componentwise maxima
        assert got == maxr


@pytest.mark.parametrize("method", METHODS)
def test_depthwise_is_refused_with_reason(method: str) -> None:
    cls = LAYER_REGISTRY[method]
    conv = nn.Conv2d(4, 4, 3, groups=4)
    maxr = cls.max_ranks(ConvGeometry(4, 4, (3, 3)))  # type: ignore[attr-defined]
    with pytest.raises(TensorcutError, match="depthwise|groups"):
        cls.from_conv(conv, maxr)  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", ["cp", "tt", "tucker", "tucker2"])
def test_grouped_partial_rank_is_blockwise(method: str) -> None:
    """Per-group decomposition equals decomposing each group's conv on its own."""
    cls = LAYER_REGISTRY[method]
    torch.manual_seed(4)
    conv = nn.Conv2d(6, 4, 3, padding=1, groups=2).double()
    maxr = cls.max_ranks(ConvGeometry.from_conv(conv))  # type: ignore[attr-defined]
    ranks = tuple(max(1, m // 2) for m in maxr)
    layer = cls.from_conv(conv, ranks)  # type: ignore[attr-defined]
    W = layer.reconstruct_weight().detach()
    for k in range(2):
        part = nn.Conv2d(3, 2, 3, padding=1).double()
        with torch.no_grad():
            part.weight.copy_(conv.weight[2 * k : 2 * k + 2])
        single = cls.from_conv(part, ranks)  # type: ignore[attr-defined]
        torch.testing.assert_close(W[2 * k : 2 * k + 2], single.reconstruct_weight().detach())


def _decaying_conv(cin: int = 12, cout: int = 10, k: int = 3, seed: int = 5) -> nn.Conv2d:
    """A conv whose kernel has decaying spectra, so eps rules pick intermediate ranks."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, padding=1).double()
    A = torch.randn(cout, 4, dtype=torch.float64, generator=g)
    B = torch.randn(4, cin * k * k, dtype=torch.float64, generator=g)
    with torch.no_grad():
        noise = torch.randn(conv.weight.shape, generator=g, dtype=torch.float64)
        conv.weight.copy_((A @ B).reshape(conv.weight.shape) + 0.05 * noise)
    return conv


@pytest.mark.parametrize("method", ["tucker2", "tucker", "tt", "cp"])
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_eps_rule_meets_bound(method: str, eps: float) -> None:
    cls = LAYER_REGISTRY[method]
    conv = _decaying_conv()
    layer = cls.from_conv(conv, eps=eps)  # type: ignore[attr-defined]
    err = _rel(layer.reconstruct_weight().detach(), conv.weight.detach())
    assert err <= eps + 1e-12
    assert abs(layer.rel_error - err) < 1e-12  # type: ignore[attr-defined]
    assert tuple(layer.ranks) != tuple(cls.max_ranks(layer.geometry))  # type: ignore[attr-defined]
    same = cls.from_conv(conv, energy=1 - eps**2)  # type: ignore[attr-defined]
    assert tuple(same.ranks) == tuple(layer.ranks)


def test_eps_with_groups_uses_common_ranks() -> None:
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=2).double()
    for cls in (TuckerConv2d, TTConv2d):
        layer = cls.from_conv(conv, eps=0.4)
        assert _rel(layer.reconstruct_weight().detach(), conv.weight.detach()) <= 0.4 + 1e-12


def test_bad_arguments() -> None:
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(TensorcutError):
        TuckerConv2d.from_conv(conv, (2, 2), eps=0.1)
    with pytest.raises(TensorcutError):
        TuckerConv2d.from_conv(conv, (2, 2, 2))
    with pytest.raises(TensorcutError):
        TTConv2d.from_conv(conv, 2, bogus=1)
    with pytest.raises(TensorcutError):
        CPConv2d(ConvGeometry(4, 6, (3, 3)), (2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TTConv2d.from_conv(conv, 2)  # an in-range rank warns about nothing


# ---------------------------------------------------------------- memory layout (GEMM 1x1s)
LAYOUT_COMBOS = [
    {
        "kernel_size": 3,
        "stride": (1, 1),
        "padding": 1,
        "dilation": 1,
        "padding_mode": "zeros",
        "bias": True,
        "groups": 1,
    },
    {
        "kernel_size": (2, 3),
        "stride": (2, 1),
        "padding": "valid",
        "dilation": 1,
        "padding_mode": "reflect",
        "bias": False,
        "groups": 1,
    },
    {
        "kernel_size": 1,
        "stride": (2, 2),
        "padding": 0,
        "dilation": 1,
        "padding_mode": "zeros",
        "bias": True,
        "groups": 2,
    },
]


@pytest.mark.parametrize("combo", LAYOUT_COMBOS, ids=_id)
@pytest.mark.parametrize("method", METHODS)
def test_output_follows_input_memory_format(method: str, combo: dict[str, Any]) -> None:
    """Contiguous in -> contiguous out, channels-last in -> channels-last out, same values as the
    dense conv either way (the 1x1s run as GEMMs on views of the input)."""
    conv = _conv(combo)
    layer = _from_conv_full(LAYER_REGISTRY[method], conv)
    if layer is None:
        return
    x = _input()
    xcl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, out_cl = layer(x), layer(xcl)
        out_strided = layer(x[:, :, :, 1:])  # neither layout
    torch.testing.assert_close(out, conv(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_cl, out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out_strided, conv(x[:, :, :, 1:]), atol=1e-5, rtol=1e-5)
    assert out.is_contiguous()
    assert out_cl.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("like", [None, "contiguous", "channels_last", torch.contiguous_format])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_equals_conv2d(layout: str, like: Any, bias: bool) -> None:
    from tensorcut.layers.base import PointwiseConv2d

    torch.manual_seed(0)
    ref = nn.Conv2d(5, 7, 1, bias=bias).double()
    pw = PointwiseConv2d(5, 7, 1, bias=bias).double()
    pw.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 6, 9, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, :, ::2, 1:]
    like_t = (
        like
        if not isinstance(like, str)
        else torch.zeros(1, 2, 3, 4).contiguous(
            memory_format=torch.channels_last
            if like == "channels_last"
            else torch.contiguous_format
        )
    )
    out = pw(x, like_t)
    torch.testing.assert_close(out, ref(x), atol=1e-12, rtol=1e-12)
    if like in ("contiguous", torch.contiguous_format):
        assert out.is_contiguous()
    else:
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    out.sum().backward()  # gradients flow to the same parameters as nn.Conv2d's
    ref(x).sum().backward()
    torch.testing.assert_close(pw.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("method", METHODS)
def test_fx_traceable(method: str) -> None:
    """The analysis cache traces models with torch.fx: a compressed model must stay traceable."""
    import torch.fx

    conv = _conv(LAYOUT_COMBOS[0])
    layer = _from_conv_full(LAYER_REGISTRY[method], conv)
    assert layer is not None
    model = nn.Sequential(layer, nn.ReLU())
    gm = torch.fx.symbolic_trace(model)
    x = _input()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_contract_hooks_are_consistent(method: str) -> None:
    """reference_ranks within max_ranks; error_bound (where a method has one) bounds the error the
    decomposition reaches, and is 0 at the maximal ranks."""
    cls = LAYER_REGISTRY[method]
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, padding=1)
    geom = ConvGeometry.from_conv(conv)
    mx = tuple(cls.max_ranks(geom))
    ref = tuple(cls.reference_ranks(geom))
    assert len(ref) == len(mx) and all(1 <= r <= m for r, m in zip(ref, mx, strict=True))
    cache: dict = {}
    half = tuple(max(1, m // 2) for m in mx)
    bound = cls.error_bound(conv.weight, geom, half, cache)
    if bound is None:
        return
    layer = cls.from_conv(conv, ranks=half)
    W = conv.weight.detach().double()
    err = float(torch.linalg.vector_norm(W - layer.reconstruct_weight().detach().double()))
    # HOOI refines the HOSVD, so the reached error is at most the bound (float32 factors: + 1e-5)
    assert err / float(torch.linalg.vector_norm(W)) <= bound + 1e-5
    assert cls.error_bound(conv.weight, geom, mx, cache) == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------- the declared contract
@pytest.mark.parametrize("method", METHODS)
def test_every_method_declares_the_contract(method: str) -> None:
    """The registry key is the class's ``method``; ``Options`` is a frozen dataclass whose fields
    all default to None (the decomposition's own default); ``fallback`` names a registered
    method."""
    cls = LAYER_REGISTRY[method]
    assert cls.method == method and issubclass(cls, FactorizedConv2d)
    assert issubclass(cls.Options, MethodOptions) and dataclasses.is_dataclass(cls.Options)
    opts = cls.Options()
    assert opts.kwargs() == {} and isinstance(opts.fast(), cls.Options)
    assert all(f.default is None for f in dataclasses.fields(cls.Options))
    if dataclasses.fields(cls.Options):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(opts, dataclasses.fields(cls.Options)[0].name, 1)
    assert cls.fallback is None or cls.fallback in LAYER_REGISTRY
    assert isinstance(cls.in_auto, bool) and isinstance(cls.supports_vbmf, bool)
    geom = ConvGeometry(8, 6, (3, 3), padding=(1, 1))
    mx = tuple(cls.max_ranks(geom))
    assert mx and all(isinstance(r, int) and r >= 1 for r in mx)


@pytest.mark.parametrize("method", METHODS)
def test_options_parse_refuses_unknown_names_in_one_line(method: str) -> None:
    cls = LAYER_REGISTRY[method]
    names = [f.name for f in dataclasses.fields(cls.Options)]
    valid = ", ".join(names) if names else "none (this method takes no options)"
    with pytest.raises(TensorcutError) as e:
        cls.Options.parse(method, {"bogus": 1})
    assert str(e.value) == f"unknown options for {method}: ['bogus']; valid: {valid}"
    with pytest.raises(TensorcutError) as e:
        cls.Options.parse(method, [1])  # type: ignore[arg-type]
    assert str(e.value) == (
        f"options for {method} must be a dict or {cls.Options.__name__}, got list"
    )
    assert cls.Options.parse(method, None) == cls.Options()
    if names:
        parsed = cls.Options.parse(method, {names[0]: 3})
        assert parsed.kwargs() == {names[0]: 3} and cls.Options.parse(method, parsed) is parsed


@pytest.mark.parametrize("method", METHODS)
def test_parent_modules_read_the_dense_attributes(method: str) -> None:
    """A factorized layer answers ``in_channels``/``stride``/``weight``... as the conv it
    replaced did (some parent modules read them)."""
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 8, (3, 1), stride=(2, 1), padding=(1, 0), bias=False).double()
    layer = LAYER_REGISTRY[method].from_conv(
        conv, LAYER_REGISTRY[method].max_ranks(ConvGeometry.from_conv(conv))
    )  # type: ignore[attr-defined]
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert layer.padding_mode == "zeros" and layer.bias is None
    assert layer.weight.shape == conv.weight.shape
    torch.testing.assert_close(layer.weight, conv.weight, atol=1e-6, rtol=1e-6)
