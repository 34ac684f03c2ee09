"""CP convolution (``layers/cp.py``): structure, CP-ALS options, failures as ConvergenceError.

What every method must do (full-rank equivalence, counts, round trips) is in test_base.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorcut.errors import ConvergenceError, TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.layers import CPConv2d, CPOptions, get_method

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def test_structure_is_pointwise_depthwise_depthwise_pointwise() -> None:
    """1x1 (IN->R) -> depthwise KHx1 -> depthwise 1xKW -> 1x1 (R->OUT, bias)."""
    layer = CPConv2d(ConvGeometry(4, 6, (3, 5), stride=(2, 1), padding=(1, 2)), 7)
    assert layer.first.weight.shape == (7, 4, 1, 1) and layer.first.bias is None
    assert layer.vertical.weight.shape == (7, 1, 3, 1) and layer.vertical.groups == 7
    assert layer.horizontal.weight.shape == (7, 1, 1, 5) and layer.horizontal.groups == 7
    assert layer.last.weight.shape == (6, 7, 1, 1) and layer.last.bias is not None
    assert layer.ranks == (7,)
    assert layer.num_params() == 7 * (4 + 6) + 7 * (3 + 5) + 6


def test_declares_tucker2_fallback_and_typed_options() -> None:
    assert get_method("cp") is CPConv2d and CPConv2d.Options is CPOptions
    assert CPConv2d.fallback == "tucker2" and CPConv2d.in_auto
    opts = CPOptions(n_iter_max=300, seed=3)
    assert opts.kwargs() == {"n_iter_max": 300, "seed": 3}
    assert opts.fast().n_iter_max == 25 and CPOptions().fast().n_iter_max == 25
    assert CPOptions(n_iter_max=10).fast().n_iter_max == 10


def test_eps_search_meets_the_bound_with_a_small_rank() -> None:
    """A kernel of exact CP rank 2: an eps search stops far below the maximal rank."""
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (6, 4, 3, 3))
    W = torch.einsum("or,ir,hr,wr->oihw", a, b, c, d)
    conv = nn.Conv2d(4, 6, 3, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(W)
    layer = CPConv2d.from_conv(conv, eps=1e-3, n_iter_max=500)
    assert layer.rel_error is not None and layer.rel_error <= 1e-3
    assert layer.ranks[0] <= 4 < CPConv2d.max_ranks(ConvGeometry.from_conv(conv))[0]
    assert layer.fit_info is not None and len(layer.fit_info) == 1


def test_unknown_option_and_both_rules_refused() -> None:
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(TensorcutError, match=r"unknown options for cp: \['bogus'\]"):
        CPConv2d.from_conv(conv, 2, bogus=1)
    with pytest.raises(TensorcutError, match="give ranks or eps/energy, not both"):
        CPConv2d.from_conv(conv, 2, eps=0.1)


def test_constructor_is_zero_filled_and_reset_parameters_randomises() -> None:
    layer = CPConv2d(ConvGeometry(4, 6, (3, 3)), 5)
    assert all(bool((p == 0).all()) for p in layer.parameters())
    layer.reset_parameters()
    assert all(bool((p != 0).any()) for p in layer.parameters())


def test_cp_failure_propagates_as_convergence_error() -> None:
    conv = nn.Conv2d(4, 6, 3).double()
    with pytest.raises(ConvergenceError):
        CPConv2d.from_conv(conv, 4, max_norm_ratio=1e-6)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConvergenceError):
        CPConv2d.from_conv(conv, 4)
