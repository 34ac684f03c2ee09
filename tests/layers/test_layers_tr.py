"""TRConv2d: the four-sublayer forward, counts, gradients, checkpoint round trip, refusals."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorcut.decompose.svd import RankClampWarning
from tensorcut.errors import TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.layers.base import LAYER_REGISTRY
from tensorcut.layers.tr import TRConv2d

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _conv(cin: int, cout: int, k, seed: int = 0, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, **kw).double()


def _dense_ref(layer: TRConv2d, x: torch.Tensor) -> torch.Tensor:
    """F.conv2d with the reconstructed kernel, padding applied the dense way."""
    g = layer.geometry
    mode = {
        "zeros": "constant",
        "reflect": "reflect",
        "replicate": "replicate",
        "circular": "circular",
    }[g.padding_mode]
    xp = F.pad(x, g.pad, mode=mode)
    return F.conv2d(
        xp, layer.reconstruct_weight(), layer.bias, stride=g.stride, dilation=g.dilation
    )


# (kernel, stride, padding, dilation, padding_mode, bias)
GEOMETRIES = [
    (3, 1, 1, 1, "zeros", True),
    (3, 2, 1, 1, "zeros", False),
    (3, (2, 1), (1, 2), 1, "reflect", True),
    (3, (1, 3), 0, (2, 1), "replicate", True),
    (3, 1, "same", 2, "circular", False),
    (3, 1, "valid", 1, "zeros", True),
    (5, 2, 2, 1, "zeros", True),
    (5, (1, 2), "valid", (1, 2), "reflect", False),
    (1, 1, 0, 1, "zeros", True),
    (1, 2, 0, 1, "zeros", False),
    (1, (2, 3), 1, 1, "replicate", True),
    ((3, 1), (2, 1), (1, 0), 1, "zeros", True),
    ((3, 1), 1, "same", 1, "circular", False),
    ((2, 3), 1, "same", 1, "zeros", True),
    ((2, 3), (2, 2), (0, 1), (2, 1), "reflect", True),
    ((1, 3), 2, (0, 1), 1, "zeros", True),
]


def _ids(p) -> str:
    return "-".join(str(v).replace(" ", "") for v in p)


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[_ids(g) for g in GEOMETRIES])
def test_forward_matches_reconstructed_conv(geo) -> None:
    k, stride, padding, dilation, mode, bias = geo
    conv = _conv(
        5, 7, k, stride=stride, padding=padding, dilation=dilation, padding_mode=mode, bias=bias
    )
    x = torch.randn(2, 5, 11, 13, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", RankClampWarning
        )  # 1x1 / thin kernels admit less than (2, 3, 2, 2)
        fixed = TRConv2d.from_conv(conv, ranks=(2, 3, 2, 2), shift=1)
    for layer in (
        TRConv2d.from_conv(conv, eps=0.5),
        fixed,
    ):  # lossy: compare with own reconstruction
        y = layer(x)
        ref = _dense_ref(layer, x)
        assert y.shape == ref.shape == conv(x).shape
        assert (
            torch.allclose(y, ref, atol=1e-5, rtol=0)
            and float((y - ref).detach().abs().max()) < 1e-10
        )
        assert torch.allclose(layer.to_conv()(x), y, atol=1e-10)
    exact = TRConv2d.from_conv(conv)  # max ranks: the dense layer itself
    assert torch.allclose(exact(x), conv(x), atol=1e-10)


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[_ids(g) for g in GEOMETRIES])
def test_counts_match_module(geo) -> None:
    k, stride, padding, dilation, mode, bias = geo
    conv = _conv(
        6, 4, k, stride=stride, padding=padding, dilation=dilation, padding_mode=mode, bias=bias
    )
    geom = ConvGeometry.from_conv(conv)
    for ranks in [(1, 2, 3, 2), (2, 3, 1, 4), TRConv2d.max_ranks(geom)]:
        layer = TRConv2d(geom, ranks)
        a, b, c, d = ranks
        kh, kw = geom.kernel_size
        closed = a * 4 * b + b * 6 * c + c * kh * d + d * kw * a + (4 if bias else 0)
        assert layer.num_params() == TRConv2d.predicted_params(geom, ranks) == closed
        for hw in [(11, 13), (9, 12), (16, 10)]:
            assert layer.macs(hw) == TRConv2d.predicted_macs(geom, ranks, hw)
            assert layer(torch.zeros(1, 6, *hw, dtype=torch.float32)).shape[
                -2:
            ] == geom.output_size(hw)


def test_early_stride_saves_work_for_pointwise_downsampling() -> None:
    geom = ConvGeometry.from_conv(_conv(8, 16, 1, stride=2, bias=False))
    layer = TRConv2d(geom, (1, 4, 1, 1))
    assert (
        layer.in_proj.stride == (2, 2)
        and layer.vconv.stride == (1, 1)
        and layer.hconv.stride == (1, 1)
    )
    # every sublayer runs at the 8x8 output resolution of a 16x16 input
    assert layer.macs((16, 16)) == (8 * 4 * 1 + 4 * 1 * 1 + 4 * 1 * 1 + 4 * 1 * 16) * 64


def test_gradients_reach_all_four_cores() -> None:
    conv = _conv(4, 6, 3, padding=1)
    layer = TRConv2d.from_conv(conv, ranks=(2, 2, 3, 2))
    layer(torch.randn(2, 4, 6, 6, dtype=torch.float64)).square().sum().backward()
    for name in (
        "in_proj.weight",
        "vconv.weight",
        "hconv.weight",
        "out_proj.weight",
        "out_proj.bias",
    ):
        grad = dict(layer.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_state_dict_round_trip_through_config() -> None:
    conv = _conv(
        5, 8, (3, 2), stride=(2, 1), padding="valid", dilation=(1, 2), padding_mode="zeros"
    )
    layer = TRConv2d.from_conv(conv, eps=0.3)
    cfg = layer.config()
    assert cfg["method"] == "tr" and cfg["ranks"] == list(layer.ranks)
    rebuilt = LAYER_REGISTRY["tr"].from_config(cfg)
    assert isinstance(rebuilt, TRConv2d)
    rebuilt = rebuilt.double()
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 9, 12, dtype=torch.float64)
    assert torch.equal(rebuilt(x), layer(x))
    assert rebuilt.ranks == layer.ranks


def test_eps_and_energy_bound_the_kernel_error() -> None:
    conv = _conv(16, 12, 3, padding=1)
    w = conv.weight.detach()
    for kwargs, bound in [
        ({"eps": 0.3}, 0.3),
        ({"energy": 0.96}, 0.2),
        ({"eps": 0.6, "split": "zhao"}, 0.6),
    ]:
        layer = TRConv2d.from_conv(conv, **kwargs)
        err = float((layer.reconstruct_weight().detach() - w).norm() / w.norm())
        assert err <= bound + 1e-12
        assert layer.rel_error == pytest.approx(err, abs=1e-10)
        assert layer.num_params() == TRConv2d.predicted_params(layer.geometry, layer.ranks)


def test_macs_objective_through_from_conv() -> None:
    conv = _conv(12, 16, 3, stride=2, padding=1)
    geom = ConvGeometry.from_conv(conv)
    layer = TRConv2d.from_conv(conv, eps=0.5, objective="macs", input_size=(16, 16))
    res = layer.tr_result
    assert res is not None
    best = min(TRConv2d.predicted_macs(geom, c.ranks, (16, 16)) for c in res.search)
    assert layer.macs((16, 16)) == best


def test_max_ranks_reproduce_conv_exactly_float32() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 10, 3, padding=1)
    geom = ConvGeometry.from_conv(conv)
    layer = TRConv2d.from_conv(conv, ranks=TRConv2d.max_ranks(geom))
    x = torch.randn(2, 3, 8, 8)
    assert layer.in_proj.weight.dtype == torch.float32
    assert torch.allclose(layer(x), conv(x), atol=1e-5)


def test_unbatched_input() -> None:
    conv = _conv(3, 4, 3, padding=1)
    layer = TRConv2d.from_conv(conv, ranks=2)
    x = torch.randn(3, 7, 7, dtype=torch.float64)
    assert torch.allclose(layer(x), layer(x.unsqueeze(0)).squeeze(0))


def test_clamped_ranks_warn() -> None:
    conv = _conv(3, 4, 3)
    with pytest.warns(RankClampWarning):
        layer = TRConv2d.from_conv(conv, ranks=(50, 50, 50, 50))
    assert layer.ranks[0] * layer.ranks[1] <= 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TRConv2d.from_conv(conv, ranks=(1, 2, 2, 2))


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_and_depthwise_refused(groups: int) -> None:
    conv = nn.Conv2d(4, 4, 3, groups=groups)
    geom = ConvGeometry.from_conv(conv)
    msg = "depthwise" if groups == 4 else "grouped"
    with pytest.raises(TensorcutError, match=msg):
        TRConv2d.from_conv(conv, eps=0.3)
    with pytest.raises(TensorcutError, match="groups"):
        TRConv2d(geom, (1, 1, 1, 1))
    with pytest.raises(TensorcutError, match="dense"):
        TRConv2d.max_ranks(geom)


def test_bad_arguments() -> None:
    conv = _conv(3, 4, 3)
    for eps in (0.0, -1.0, 1.0, 2.0):
        with pytest.raises(TensorcutError, match="eps"):
            TRConv2d.from_conv(conv, eps=eps)
    with pytest.raises(TensorcutError, match="not both"):
        TRConv2d.from_conv(conv, ranks=2, eps=0.3)
    with pytest.raises(TensorcutError, match="energy"):
        TRConv2d.from_conv(conv, energy=0.0)
    with pytest.raises(TensorcutError, match="unknown options"):
        TRConv2d.from_conv(conv, eps=0.3, rank_rule="x")
    with pytest.raises(TensorcutError, match="unknown options"):
        TRConv2d.from_conv(conv, ranks=2, objective="macs")
    with pytest.raises(TensorcutError, match="input_size"):
        TRConv2d.from_conv(conv, eps=0.3, objective="macs")
    with pytest.raises(TensorcutError, match="ranks"):
        TRConv2d(ConvGeometry.from_conv(conv), (1, 2, 3))
    layer = TRConv2d(ConvGeometry.from_conv(conv), (1, 2, 2, 2))
    with pytest.raises(TensorcutError, match="do not match"):
        layer.load_cores([torch.zeros(1, 4, 1)] * 4)
