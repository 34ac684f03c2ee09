"""Keep grids, layer and bipartition selection, bad-input messages."""

from __future__ import annotations

import pytest
from analysis_helpers import tiny_cnn
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.study import grid


def test_default_grid_follows_tables() -> None:
    assert grid.default_keep_grid(3) == [1, 2]  # KW, KH of a 3x3 kernel: 1:2:1
    assert grid.default_keep_grid(9) == list(range(1, 9))  # OUT-IN of a 3x3 kernel: 1:8
    assert grid.default_keep_grid(16) == list(range(2, 15, 2))  # 2:14:2
    assert grid.default_keep_grid(64) == list(range(10, 61, 10))  # 10:60:10
    assert grid.default_keep_grid(128) == list(range(20, 121, 20))  # 20:120:20
    assert grid.default_keep_grid(512) == list(range(50, 501, 50))  # 50:500:50
    assert grid.default_keep_grid(1) == []


def test_select_layers_default_and_errors() -> None:
    m = tiny_cnn()
    assert grid.select_layers(m) == ["conv1", "conv2", "conv3"]
    assert grid.select_layers(tiny_cnn(in_channels=1)) == ["conv2", "conv3"]
    assert grid.select_layers(m, ["conv3", "conv1"]) == ["conv1", "conv3"]
    with pytest.raises(TensorcutError) as e:
        grid.select_layers(m, ["conv9", "fc"])
    assert str(e.value) == "unknown layer(s) 'conv9', 'fc'; valid conv layers: conv1, conv2, conv3"
    single = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    with pytest.raises(TensorcutError) as e:
        grid.select_layers(single)
    assert str(e.value) == (
        "no eligible conv layer: every Conv2d of Sequential has one input channel (0); "
        "name layers explicitly with --layers"
    )
    with pytest.raises(TensorcutError) as e:
        grid.select_layers(nn.Sequential(nn.Linear(2, 2)))
    assert str(e.value) == "Sequential has no Conv2d layer; nothing to truncate"


def test_keep_spec_forms_and_range() -> None:
    shape = (8, 6, 3, 3)
    spec = grid.parse_keep(["OUT=2:6:2", "conv2:KW=1", "3"])
    assert grid.keep_values(spec, "conv1", "OUT", shape) == [2, 4, 6]
    assert grid.keep_values(spec, "conv2", "KW", shape) == [1]
    assert grid.keep_values(spec, "conv1", "IN", shape) == [3]
    assert grid.keep_values(grid.parse_keep(None), "conv1", "KH", shape) == [1, 2]
    with pytest.raises(TensorcutError) as e:
        grid.keep_values(grid.parse_keep(["5"]), "conv2", "KW", shape)
    assert (
        str(e.value)
        == "keep=5 out of range for layer 'conv2' along KW (kernel (8, 6, 3, 3)): valid 1..3"
    )
    with pytest.raises(TensorcutError) as e:
        grid.keep_values(grid.parse_keep([0]), "conv2", "OUT", shape)
    assert (
        str(e.value)
        == "keep=0 out of range for layer 'conv2' along OUT (kernel (8, 6, 3, 3)): valid 1..8"
    )
    with pytest.raises(TensorcutError) as e:
        grid.parse_keep(["OUT=a"])
    assert "expected integers" in str(e.value)


def test_bipartition_selection() -> None:
    assert grid.select_bipartitions(["out-kw", "IN-KH", "KW"]) == ["KW", "OUT-KW"]
    with pytest.raises(TensorcutError) as e:
        grid.select_bipartitions(["OUT", "KX"])
    assert (
        str(e.value) == "unknown bipartition 'KX'; valid: OUT, IN, KH, KW, OUT-IN, OUT-KH, OUT-KW"
    )


def test_cp_ranks_and_all_layer_steps() -> None:
    assert grid.parse_cp_ranks(["10,5", 20]) == [20, 10, 5]
    assert grid.parse_cp_ranks("auto") == "auto"
    with pytest.raises(TensorcutError):
        grid.parse_cp_ranks([0])
    steps = grid.all_layer_steps({"a": 10, "b": 4}, {}, "OUT", [1.0, 0.5, 0.1])
    assert steps == [{"a": 5, "b": 2}, {"a": 1, "b": 1}]
    with pytest.raises(TensorcutError) as e:
        grid.all_layer_steps({"a": 10, "b": 4}, grid.parse_keep(["6"]), "OUT")
    assert "valid 1..4" in str(e.value)
