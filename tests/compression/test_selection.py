"""Which convolutions a plan decides on (``compression/selection.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorcut.compression import CompressConfig
from tensorcut.compression.selection import select_layers
from tensorcut.errors import TensorcutError

CFG = CompressConfig(ratio=0.5)


class _Custom(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # an unknown forward: stays dense
        return super().forward(x) * 2


def _net() -> nn.Module:
    torch.manual_seed(0)
    shared = nn.Conv2d(8, 8, 3, padding=1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # a stem: not selected by default
        shared,
        nn.ReLU(),
        shared,  # the same module under a second name
        _Custom(8, 8, 3, padding=1),
    ).eval()


def test_selection_resolves_builds_and_lists_aliases():
    sel = select_layers(_net(), CFG, input_shape=(3, 8, 8))
    assert sel.chosen == ["1", "4"]
    assert sel.aliases["1"] == ["3"]
    assert list(sel.builders) == ["1"] and sel.builders["1"].hws == [(8, 8), (8, 8)]
    assert sel.entries["4"].status == "dense" and "custom forward" in sel.entries["4"].reason
    assert sel.shape == [3, 8, 8] and sel.cost.total_macs > 0
    assert sel.args[0].shape[1:] == (3, 8, 8)


def test_selection_by_names_and_refusals():
    net = _net()
    assert select_layers(net, CFG, layers=["0", "3"], input_shape=(3, 8, 8)).chosen == ["0", "1"]
    with pytest.raises(TensorcutError, match="unknown layer '9'"):
        select_layers(net, CFG, layers=["9"], input_shape=(3, 8, 8))
    with pytest.raises(TensorcutError, match="selected no conv layer"):
        select_layers(net, CFG, lambda n, m: False, input_shape=(3, 8, 8))
    with pytest.raises(TensorcutError, match="no Conv2d layers"):
        select_layers(nn.Linear(2, 2), CFG, input_shape=(3, 8, 8))
