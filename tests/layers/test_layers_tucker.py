"""Tucker-2 and full Tucker convolutions (``layers/tucker.py``): the three-conv structure,
orthonormal factors, early stride, the HOSVD error bound and VBMF ranks.

What every method must do (full-rank equivalence, counts, round trips) is in test_base.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorcut.geometry import ConvGeometry
from tensorcut.layers import FullTuckerConv2d, TuckerConv2d, TuckerOptions

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py

HW = (11, 10)


def _input(cin: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(
        2, cin, *HW, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


def test_tucker2_sublayer_contract() -> None:
    """first = U_in^T, core = C, last = U_out (orthonormal factors), bias on last."""
    torch.manual_seed(6)
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1).double()
    layer = TuckerConv2d.from_conv(conv, (4, 3))
    assert layer.first.weight.shape == (3, 8, 1, 1) and layer.first.bias is None
    assert (
        layer.core.weight.shape == (4, 3, 3, 3)
        and layer.core.stride == (2, 2)
        and layer.core.bias is None
    )
    assert layer.last.weight.shape == (6, 4, 1, 1) and torch.equal(layer.last.bias, conv.bias)
    U_in_T = layer.first.weight[:, :, 0, 0].detach()
    U_out = layer.last.weight[:, :, 0, 0].detach()
    torch.testing.assert_close(U_in_T @ U_in_T.mT, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(U_out.mT @ U_out, torch.eye(4, dtype=torch.float64))
    assert layer.ranks == (4, 3)


def test_tucker2_ranks_follow_rewritten_sublayers() -> None:
    """A rank-adaptive integrator swaps the three convs; ranks read the new shapes."""
    geom = ConvGeometry(8, 6, (3, 3), padding=(1, 1))
    layer = TuckerConv2d(geom, (4, 3))
    layer.first = nn.Conv2d(8, 2, 1, bias=False)
    layer.core = nn.Conv2d(2, 5, 3, bias=False)
    layer.last = nn.Conv2d(5, 6, 1)
    assert layer.ranks == (5, 2)


def test_early_stride_saves_macs_and_stays_exact() -> None:
    torch.manual_seed(7)
    conv = nn.Conv2d(8, 12, 1, stride=2).double()
    layer = TuckerConv2d.from_conv(conv)
    assert layer.first.stride == (2, 2) and layer.core.stride == (1, 1)
    x = _input(8)
    torch.testing.assert_close(layer(x), conv(x))
    r_out, r_in = layer.ranks
    assert (
        layer.macs(HW)
        < r_in * 8 * HW[0] * HW[1] + 12 * r_out * 6 * 5 + r_out * r_in * HW[0] * HW[1]
    )


def test_options_and_flags() -> None:
    assert TuckerConv2d.Options is TuckerOptions and FullTuckerConv2d.Options is TuckerOptions
    assert TuckerConv2d.supports_vbmf and not FullTuckerConv2d.supports_vbmf
    assert TuckerConv2d.in_auto and not FullTuckerConv2d.in_auto
    assert TuckerOptions(n_iter=5).fast() == TuckerOptions(hooi=False, n_iter=5)


def test_hosvd_only_is_not_better_than_hooi() -> None:
    """HOOI refines the HOSVD: at the same ranks its kernel error is no larger."""
    torch.manual_seed(8)
    conv = nn.Conv2d(8, 10, 3, padding=1).double()
    hosvd = TuckerConv2d.from_conv(conv, (4, 3), hooi=False)
    hooi = TuckerConv2d.from_conv(conv, (4, 3))
    assert hooi.rel_error <= hosvd.rel_error + 1e-12  # type: ignore[operator]
    bound = TuckerConv2d.error_bound(conv.weight, ConvGeometry.from_conv(conv), (4, 3), {})
    assert bound is not None and hosvd.rel_error <= bound + 1e-9  # type: ignore[operator]


def test_vbmf_ranks_within_the_maximum() -> None:
    torch.manual_seed(9)
    conv = nn.Conv2d(16, 12, 3)
    r = TuckerConv2d.vbmf_ranks(conv.weight.detach())
    mx = TuckerConv2d.max_ranks(ConvGeometry.from_conv(conv))
    assert len(r) == 2 and all(1 <= a <= m for a, m in zip(r, mx, strict=True))


def test_full_tucker_keeps_tucker2_structure_and_its_spatial_ranks() -> None:
    torch.manual_seed(10)
    conv = nn.Conv2d(6, 8, 3, padding=1).double()
    layer = FullTuckerConv2d.from_conv(conv, (5, 4, 2, 3))
    assert layer.ranks == (5, 4, 2, 3)
    assert layer.first.weight.shape == (4, 6, 1, 1) and layer.core.weight.shape == (5, 4, 3, 3)
    assert layer.num_params() == TuckerConv2d(ConvGeometry.from_conv(conv), (5, 4)).num_params()
    assert FullTuckerConv2d.from_config(layer.config()).ranks == (5, 4, 2, 3)
    # the middle kernel has rank <= 2 along KH (the spatial factor constrains it)
    core = layer.core.weight.detach().permute(2, 0, 1, 3).reshape(3, -1)
    assert int(torch.linalg.matrix_rank(core)) <= 2
