"""tensorcut.compression.effective: what a convolution module computes, or why it stays dense."""

import pytest
import torch
from torch import nn

from tensorcut.compression.effective import Resolved, known_kinds, resolve
from tensorcut.geometry import ConvGeometry, SameConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


class _Doubling(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class _NoOverride(nn.Conv2d):
    """A subclass that adds nothing to forward: a plain convolution."""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_plain_conv_resolves_to_a_copy_with_the_same_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
    r = resolve(conv)
    assert isinstance(r, Resolved) and r.kind == "nn.Conv2d"
    assert (
        r.conv is not conv
        and torch.equal(r.conv.weight, conv.weight)
        and torch.equal(r.conv.bias, conv.bias)
    )
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    assert torch.equal(r.conv(x), conv(x))


def test_subclass_without_forward_is_plain():
    r = resolve(_NoOverride(3, 4, 3))
    assert isinstance(r, Resolved) and r.kind == "_NoOverride (nn.Conv2d forward)"


def test_custom_forward_is_left_dense_unless_opted_in():
    m = _Doubling(3, 4, 3)
    assert resolve(m) == "custom forward (_Doubling)"
    r = resolve(m, allow_custom_forward=True)
    assert isinstance(r, Resolved) and "opted in" in r.kind


def test_forward_hooks_leave_a_conv_dense():
    m = nn.Conv2d(3, 4, 3)
    m.register_forward_hook(lambda *a: None)
    assert resolve(m) == "forward hooks attached to Conv2d (they may change what it computes)"


def test_quantization_aware_modules_are_left_dense():
    qat = pytest.importorskip("torch.ao.nn.intrinsic.qat")
    qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    m = qat.ConvBnReLU2d(4, 8, 3, qconfig=qconfig)
    reason = resolve(m)
    assert isinstance(reason, str) and reason.startswith("quantization-aware ConvBnReLU2d")


def test_parametrized_weight_is_folded():
    conv = nn.Conv2d(3, 4, 3).double()
    torch.nn.utils.parametrizations.weight_norm(conv)
    r = resolve(conv)
    assert isinstance(r, Resolved) and "parametrized weight folded" in r.kind
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    assert _rel(r.conv(x), conv(x)) < 1e-14


@pytest.mark.parametrize("size", [15, 16, 17])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_conv_pads_like_tensorflow(size, stride):
    """Output size ceil(i / s); padding total max((ceil(i/s) - 1) * s + (k - 1) * d + 1 - i, 0).

    The odd unit goes after.
    """
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, (3, 4), stride=stride, dilation=(1, 2)).double()
    x = torch.randn(1, 2, size, size + 1, dtype=torch.float64)
    geom = ConvGeometry.from_conv(conv)
    pads = []
    for i, k, d in ((size + 1, 4, 2), (size, 3, 1)):
        total = max((-(-i // stride) - 1) * stride + (k - 1) * d + 1 - i, 0)
        pads += [total // 2, total - total // 2]
    assert geom.pad_at((size, size + 1)) == tuple(pads)
    ref = nn.functional.conv2d(
        nn.functional.pad(x, pads), conv.weight, conv.bias, stride, 0, (1, 2)
    )
    y = conv(x)
    assert (
        y.shape[-2:]
        == (-(-size // stride), -(-(size + 1) // stride))
        == geom.output_size((size, size + 1))
    )
    assert torch.equal(y, ref)


def test_known_kinds_lists_the_timm_classes():
    assert (
        "timm.layers.ScaledStdConv2dSame" in known_kinds()
        and "timm.layers.Conv2dSame" in known_kinds()
    )


TIMM_CASES = [
    ("Conv2dSame", {}),
    ("StdConv2d", {}),
    ("StdConv2dSame", {}),
    ("ScaledStdConv2d", {"gain_init": 0.7}),
    ("ScaledStdConv2dSame", {"gain_init": 1.3}),
]


@pytest.mark.parametrize("cls_name,kw", TIMM_CASES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [15, 16])
def test_timm_subclasses_resolve_exactly(cls_name, kw, stride, size):
    from real_networks._torchvision_ops import (
        import_model_libraries,
    )  # defines torchvision's op schemas first

    timm, _ = import_model_libraries()
    layers = timm.layers
    torch.manual_seed(0)
    cls = getattr(layers, cls_name)
    if cls_name in ("Conv2dSame",):
        m = cls(4, 6, 3, stride=stride, **kw)
    elif cls_name.endswith("Same"):
        m = cls(4, 6, 3, stride=stride, padding="SAME", **kw)
    else:
        m = cls(4, 6, 3, stride=stride, **kw)
    if hasattr(m, "gain"):
        with torch.no_grad():
            m.gain.uniform_(0.5, 1.5)
    m = m.double().eval()
    r = resolve(m)
    assert isinstance(r, Resolved), r
    assert r.kind.startswith(f"timm {cls_name}")
    x = torch.randn(2, 4, size, size, dtype=torch.float64)
    assert _rel(r.conv(x), m(x)) < 1e-12
