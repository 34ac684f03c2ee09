"""The TDLRT view of a Tucker layer (tensorcut.train.tdlrt_layers): which layers the integrator
trains, reading and writing factors, rank bounds, the rank report."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tdlrt_util import build_layer, conv_ref, kernel, small_net
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.layers.tucker import FullTuckerConv2d, TuckerConv2d
from tensorcut.train.tdlrt_convert import tuckerize
from tensorcut.train.tdlrt_layers import (
    check_hparams,
    dense_convs,
    factors,
    is_tucker_layer,
    layer_sizes,
    mode_bounds,
    rank_report,
    tucker_layers,
    write_factors,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_which_layers_the_integrator_trains() -> None:
    geom = ConvGeometry.from_conv(nn.Conv2d(8, 6, 3, padding=1))
    grouped = ConvGeometry.from_conv(nn.Conv2d(8, 6, 3, padding=1, groups=2))
    assert is_tucker_layer(TuckerConv2d(geom, (3, 4)))
    assert not is_tucker_layer(TuckerConv2d(grouped, (2, 2)))  # block-diagonal factors
    assert not is_tucker_layer(FullTuckerConv2d(geom, (3, 4, 3, 3)))  # records spatial ranks
    assert not is_tucker_layer(nn.Conv2d(8, 6, 3))
    m = nn.Sequential(nn.Conv2d(3, 8, 1), TuckerConv2d(geom, (3, 4)), nn.Conv2d(6, 6, 1))
    assert list(tucker_layers(m)) == ["1"]
    assert [n for n, _ in dense_convs(m)] == ["0", "2"]  # not the convolutions inside layer 1


def test_factors_round_trip_and_new_ranks_change_the_shapes() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1, stride=2)
    U_out = torch.linalg.qr(torch.randn(5, 3)).Q
    U_in = torch.linalg.qr(torch.randn(6, 2)).Q
    C = torch.randn(3, 2, 3, 3)
    layer = build_layer(conv, U_out, C, U_in)
    got = factors(layer)
    assert all(torch.equal(a, b) for a, b in zip(got, (U_out, C, U_in), strict=True))
    assert torch.allclose(kernel(layer), torch.einsum("oa,abhw,ib->oihw", U_out, C, U_in))
    x = torch.randn(2, 6, 7, 7)
    assert torch.allclose(layer(x), conv_ref(layer, x), atol=1e-6)
    weight = layer.core.weight
    write_factors(layer, U_out[:, :2], C[:2, :1], U_in[:, :1])  # fewer directions
    assert layer.core.weight is weight and layer.ranks == (2, 1)  # same Parameter, new data
    assert (layer.first.out_channels, layer.core.in_channels, layer.last.in_channels) == (1, 1, 2)
    assert layer_sizes(layer) == (5, 6)
    assert torch.allclose(layer(x), conv_ref(layer, x), atol=1e-6)


def test_rank_bounds_and_hyperparameters() -> None:
    assert mode_bounds(10, 2, None) == (2, 10)
    assert mode_bounds(10, 2, 4) == (2, 4)
    assert mode_bounds(3, 4, None) == (3, 3)  # rmin above the mode: the mode wins
    check_hparams(0.0, 1, None, 0.1)
    for args, msg in [
        ((1.0, 2, None, 0.1), "tau must be a relative tolerance in [0, 1); got 1.0"),
        ((float("nan"), 2, None, 0.1), "tau must be a relative tolerance in [0, 1); got nan"),
        ((0.1, 0, None, 0.1), "rmin must be >= 1; got 0"),
        ((0.1, 3, 2, 0.1), "rmax (2) must be >= rmin (3)"),
        ((0.1, 2, None, 0.0), "learning rate must be > 0; got 0.0"),
    ]:
        with pytest.raises(TensorcutError) as e:
            check_hparams(*args)
        assert str(e.value) == msg


def test_rank_report_counts_every_convolution() -> None:
    torch.manual_seed(0)
    m = tuckerize(small_net(), init_rank=(3, 2))
    rep: dict[str, Any] = rank_report(m)
    assert set(rep["layers"]) == {"3", "6"}
    first = 6 * 12 * 9 + 12  # the dense first conv counts the same on both sides
    l3 = rep["layers"]["3"]  # 12 -> 12, 3x3, no bias
    assert l3["ranks"] == [3, 2] and l3["sizes"] == [12, 12]
    assert l3["dense_params"] == 12 * 12 * 9 and l3["params"] == 12 * 2 + 3 * 2 * 9 + 12 * 3
    l6 = rep["layers"]["6"]  # 12 -> 24, 3x3, bias
    assert l6["dense_params"] == 24 * 12 * 9 + 24
    assert l6["params"] == 12 * 2 + 3 * 2 * 9 + 24 * 3 + 24
    assert rep["conv_dense_params"] == first + l3["dense_params"] + l6["dense_params"]
    assert rep["conv_params"] == first + l3["params"] + l6["params"]
    assert rep["conv_cr"] == pytest.approx(rep["conv_dense_params"] / rep["conv_params"])
    assert rep["conv_compression_pct"] == pytest.approx(100 * (1 - 1 / rep["conv_cr"]))
