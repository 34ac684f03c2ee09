"""TT convolution (``layers/tt.py``): the four-conv structure, ranks per group, TT-SVD bounds.

What every method must do (full-rank equivalence, counts, round trips) is in test_base.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.layers import TTConv2d, get_method

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def test_structure_is_1x1_khx1_1xkw_1x1() -> None:
    """1x1 (IN->r1) -> KHx1 (r1->r2) -> 1xKW (r2->r3) -> 1x1 (r3->OUT, bias)."""
    layer = TTConv2d(ConvGeometry(5, 7, (3, 2), padding=(1, 0)), (2, 3, 4))
    assert layer.first.weight.shape == (2, 5, 1, 1)
    assert layer.vertical.weight.shape == (3, 2, 3, 1)
    assert layer.horizontal.weight.shape == (4, 3, 1, 2)
    assert layer.last.weight.shape == (7, 4, 1, 1) and layer.last.bias is not None
    assert layer.ranks == (2, 3, 4)
    assert layer.num_params() == 2 * 5 + 2 * 3 * 3 + 3 * 4 * 2 + 4 * 7 + 7


def test_max_ranks_are_the_tt_bounds_of_in_kh_kw_out() -> None:
    """Mode order (IN, KH, KW, OUT): each rank is the smaller side of its unfolding."""
    assert TTConv2d.max_ranks(ConvGeometry(4, 6, (3, 3))) == (4, 12, 6)
    assert TTConv2d.max_ranks(ConvGeometry(64, 2, (3, 3))) == (3 * 3 * 2, 3 * 2, 2)
    assert get_method("tt") is TTConv2d and not TTConv2d.supports_vbmf


def test_an_int_rank_means_every_rank() -> None:
    conv = nn.Conv2d(6, 6, 3).double()
    assert TTConv2d.from_conv(conv, 2).ranks == (2, 2, 2)


def test_eps_is_a_bound_on_the_kernel_error_and_energy_is_its_square() -> None:
    torch.manual_seed(11)
    conv = nn.Conv2d(8, 10, 3, padding=1).double()
    layer = TTConv2d.from_conv(conv, eps=0.5)
    W = conv.weight.detach()
    err = float(torch.linalg.vector_norm(W - layer.reconstruct_weight().detach()))
    assert err / float(torch.linalg.vector_norm(W)) <= 0.5 + 1e-12
    assert TTConv2d.from_conv(conv, energy=0.75).ranks == layer.ranks
    assert layer.ranks != TTConv2d.max_ranks(ConvGeometry.from_conv(conv))


def test_options_refused_in_one_line() -> None:
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(TensorcutError) as e:
        TTConv2d.from_conv(conv, 2, n_iter=3)
    assert str(e.value) == "unknown options for tt: ['n_iter']; TT-SVD takes ranks, eps or energy"
    with pytest.raises(TensorcutError, match="give ranks or eps/energy, not both"):
        TTConv2d.from_conv(conv, 2, energy=0.9)


def test_grouped_layer_keeps_common_ranks() -> None:
    """One TT per group, padded to common ranks: every group reconstructs exactly at max rank."""
    torch.manual_seed(12)
    conv = nn.Conv2d(6, 4, 3, padding=1, groups=2).double()
    layer = TTConv2d.from_conv(conv, TTConv2d.max_ranks(ConvGeometry.from_conv(conv)))
    torch.testing.assert_close(layer.reconstruct_weight(), conv.weight, atol=1e-10, rtol=1e-10)
    x = torch.randn(1, 6, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-10, rtol=1e-10)
