"""Convolution geometry (``tensorcut/geometry.py``): the JSON round trip, closed-form counts,
TensorFlow "SAME" padding, where a factorized layer pads, and the spatial sizes it passes
through — each checked against what ``torch.nn.functional.conv2d`` computes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorcut.geometry import (
    ConvGeometry,
    SameConv2d,
    early_stride,
    explicit_pad,
    pair,
    split_padding,
    stage_sizes,
)


def test_conv_geometry_round_trips_and_counts() -> None:
    conv = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    geom = ConvGeometry.from_conv(conv)
    assert ConvGeometry.from_dict(json.loads(json.dumps(geom.to_dict()))) == geom
    assert geom.dense_params() == sum(p.numel() for p in conv.parameters())
    x = torch.zeros(1, 4, 9, 7)
    assert tuple(conv(x).shape[2:]) == tuple(geom.output_size((9, 7)))
    oh, ow = geom.output_size((9, 7))
    assert geom.dense_macs((9, 7)) == 6 * (4 // 2) * 3 * 2 * oh * ow
    rebuilt = geom.make_conv()
    assert ConvGeometry.from_conv(rebuilt) == geom and type(rebuilt) is nn.Conv2d


def test_same_conv2d_pads_like_tensorflow() -> None:
    """TF 'same' with stride 2 on an even input pads (0, 1) per axis: the output is ceil(H/2)."""
    torch.manual_seed(0)
    same = SameConv2d(3, 5, 3, stride=2).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (0, 1, 0, 1)), same.weight, same.bias, stride=2
    )
    torch.testing.assert_close(same(x), ref)
    assert same(x).shape[2:] == (4, 4)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_explicit_pad_then_valid_conv_equals_the_padded_conv(mode: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode=mode).double()
    geom = ConvGeometry.from_conv(conv)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    y = F.conv2d(explicit_pad(x, geom), conv.weight, conv.bias)
    torch.testing.assert_close(y, conv(x))


def test_split_padding_lets_the_convolutions_pad_only_symmetric_zeros() -> None:
    assert split_padding(ConvGeometry.from_conv(nn.Conv2d(2, 2, 3, padding=(1, 2)))) == (
        (1, 2),
        False,
    )
    for conv in (
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(2, 2, 2, padding="same"),  # even kernel: asymmetric
        SameConv2d(2, 2, 3, stride=2),  # computed from the input size
    ):
        assert split_padding(ConvGeometry.from_conv(conv)) == ((0, 0), True)


def test_early_stride_only_where_a_one_wide_unpadded_axis_allows_it() -> None:
    assert early_stride(ConvGeometry.from_conv(nn.Conv2d(2, 2, 1, stride=2))) == (2, 2)
    assert early_stride(
        ConvGeometry.from_conv(nn.Conv2d(2, 2, (3, 1), stride=2, padding=(1, 0)))
    ) == (1, 2)
    assert early_stride(ConvGeometry.from_conv(nn.Conv2d(2, 2, 3, stride=2, padding=1))) == (1, 1)
    assert early_stride(ConvGeometry.from_conv(SameConv2d(2, 2, 1, stride=2))) == (1, 1)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Conv2d(2, 3, 1, stride=2),
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
        SameConv2d(2, 3, 3, stride=2),
    ],
)
def test_stage_sizes_end_at_the_dense_output_size(conv: nn.Conv2d) -> None:
    geom = ConvGeometry.from_conv(conv)
    hw = (9, 8)
    first, padded, out = stage_sizes(geom, hw)
    assert out == tuple(conv(torch.zeros(1, 2, *hw)).shape[2:])
    eh, ew = early_stride(geom)
    assert first == ((hw[0] - 1) // eh + 1, (hw[1] - 1) // ew + 1)
    assert padded[0] >= first[0] and padded[1] >= first[1]


def test_pair_repeats_an_int_and_names_the_argument_it_refuses() -> None:
    from tensorcut.errors import TensorcutError

    assert pair(3) == (3, 3) and pair((2,)) == (2, 2) and pair([1, 4]) == (1, 4)
    with pytest.raises(TensorcutError, match=r"^stride must be an int or a pair, got \(1, 2, 3\)$"):
        pair((1, 2, 3), "stride")
    with pytest.raises(TensorcutError, match=r"^input_size must be an int or a pair, got True$"):
        pair(True, "input_size")
