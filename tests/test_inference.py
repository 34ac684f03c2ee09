"""prepare_for_inference: the same function (float64, ~1e-12 relative), BatchNorms folded only
where provably safe, factorized 1x1 chains merged to the fewest MACs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import tensorcut.layers  # noqa: F401  (registers every layer class)
from tensorcut.errors import TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.inference import (
    MergedCPConv2d,
    PointwiseChain,
    bn_affine,
    cheapest_chain,
    conv_bn_pairs,
    fold_affine_,
    prepare_for_inference,
)
from tensorcut.layers.base import LAYER_REGISTRY, FactorizedConv2d, PointwiseConv2d
from tensorcut.models import create

pytestmark = pytest.mark.usefixtures("one_thread")

# float64 rounding through ~50 layers of O(100)-term sums stays far below this
RTOL = 1e-12


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.float64))
            m.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64))
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _factorize(model: nn.Module, method: str) -> nn.Module:
    """Swap every conv with > 3 input channels for a random factorized layer of ``method``."""
    torch.manual_seed(0)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Conv2d and m.in_channels > 3 and m.groups == 1:
            geom = ConvGeometry.from_conv(m)
            cls = LAYER_REGISTRY[method]
            ranks = tuple(max(1, min(r, 6)) for r in cls.max_ranks(geom))
            layer = cls(geom, ranks, dtype=torch.float64)
            layer.reset_parameters()
            model.set_submodule(name, layer)
    return model


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zoo_resnet_same_function_all_bn_folded(name):
    torch.manual_seed(0)
    model = _randomize_bn(create(name, width=0.25).double().eval())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prep = prepare_for_inference(model)
    with torch.no_grad():
        assert _rel(prep(x), model(x)) < RTOL
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prep.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("method", sorted(LAYER_REGISTRY))
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"pointwise": "gemm"},
        {"channels_last": False, "merge_pointwise": False},
        {"cp_spatial": "merged"},
    ],
)
def test_compressed_model_same_function(method, options):
    model = _randomize_bn(_factorize(create("resnet50", width=0.25).double().eval(), method))
    assert any(isinstance(m, FactorizedConv2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    prep = prepare_for_inference(model, **options)
    with torch.no_grad():
        assert _rel(prep(x), model(x)) < RTOL
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prep.modules())
    if options.get("merge_pointwise", True) and method in ("tucker2", "tucker", "cp", "tt"):
        assert any(
            isinstance(m, PointwiseChain) for m in prep.modules()
        )  # the bottlenecks' 1x1 convs
    if options.get("pointwise", "conv") == "conv":  # the default: no GEMM-path 1x1 left
        assert not any(type(m) is PointwiseConv2d for m in prep.modules())
    else:
        assert any(type(m) is PointwiseConv2d for m in prep.modules())
    if options.get("cp_spatial") == "merged" and method == "cp":
        assert any(isinstance(m, MergedCPConv2d) for m in prep.modules())


@pytest.mark.parametrize("method", sorted(LAYER_REGISTRY))
def test_fold_output_affine_scales_and_shifts_each_channel(method):
    geom = ConvGeometry(6, 5, (3, 3), padding=(1, 1), bias=False)
    cls = LAYER_REGISTRY[method]
    layer = cls(geom, tuple(min(r, 3) for r in cls.max_ranks(geom)), dtype=torch.float64)
    layer.reset_parameters()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    scale = torch.randn(5, dtype=torch.float64)
    shift = torch.randn(5, dtype=torch.float64)
    with torch.no_grad():
        want = layer(x) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        layer.fold_output_affine(scale, shift)
        assert _rel(layer(x), want) < RTOL
        assert layer.geometry.bias and _rel(layer.to_conv()(x), want) < RTOL
    with pytest.raises(TensorcutError):
        layer.fold_output_affine(scale[:3], shift[:3])


def test_bn_affine_matches_batchnorm_in_eval():
    bn = _randomize_bn(nn.BatchNorm2d(4).double()).eval()
    y = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    s, t = bn_affine(bn)
    with torch.no_grad():
        assert _rel(y * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1), bn(y)) < RTOL
    conv = nn.Conv2d(2, 4, 3, bias=False).double()
    z = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = bn(conv(z))
        fold_affine_(conv, s, t)
        assert _rel(conv(z), want) < RTOL


class _SharedOutput(nn.Module):
    """conv's output feeds the BatchNorm *and* the residual sum: the BN must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y) + y
        return self.bn2(self.conv2(z) * 2)  # bn2 reads a product, not the conv


class _Untraceable(nn.Module):
    """Data-dependent control flow defeats fx: only plain Sequential neighbours are folded."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.reused = nn.Conv2d(4, 4, 1)
        self.seq2 = nn.Sequential(self.reused, nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.seq(x)
        if float(y.sum()) > 0:
            y = y + self.reused(y)
        return self.seq2(y)


def test_bn_fed_by_shared_or_non_conv_value_is_left_alone():
    model = _randomize_bn(_SharedOutput().double()).eval()
    assert conv_bn_pairs(model) == []
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    prep = prepare_for_inference(model)
    assert isinstance(prep.bn, nn.BatchNorm2d) and isinstance(prep.bn2, nn.BatchNorm2d)
    with torch.no_grad():
        assert _rel(prep(x), model(x)) < RTOL


def test_untraceable_model_folds_only_provable_sequential_pairs():
    model = _randomize_bn(_Untraceable().double()).eval()
    assert conv_bn_pairs(model) == [("seq.0", "seq.1")]  # seq2's conv is also called on its own
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    prep = prepare_for_inference(model)
    assert isinstance(prep.seq[1], nn.Identity) and isinstance(prep.seq2[1], nn.BatchNorm2d)
    with torch.no_grad():
        assert _rel(prep(x), model(x)) < RTOL


def _chain_cost(dims: list[int], keep: list[int]) -> int:
    return sum(dims[a] * dims[b] for a, b in zip(keep, keep[1:], strict=False))


@pytest.mark.parametrize(
    "dims", [[64, 16, 16, 64], [8, 64, 64, 8], [64, 8, 8, 8, 256], [3, 5], [16, 40, 2, 40, 16]]
)
def test_cheapest_chain_is_the_brute_force_minimum(dims):
    keep = cheapest_chain(dims)
    assert keep[0] == 0 and keep[-1] == len(dims) - 1 and keep == sorted(keep)
    inner = range(1, len(dims) - 1)
    best = min(
        _chain_cost(dims, [0, *c, len(dims) - 1])
        for k in range(len(dims) - 1)
        for c in itertools.combinations(inner, k)
    )
    assert _chain_cost(dims, keep) == best


def test_bad_options_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 1))
    with pytest.raises(TensorcutError):
        prepare_for_inference(model, pointwise="fast")
    with pytest.raises(TensorcutError):
        prepare_for_inference(model, cp_spatial="fused")
