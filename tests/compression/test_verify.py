"""tensorcut.compression.verify: every swap checked on real inputs, tolerances from the dtype."""

import math

import pytest
import torch
from torch import nn

import tensorcut.layers  # noqa: F401
from tensorcut.compression.verify import capture, check_swap, relative_difference
from tensorcut.errors import TensorcutError
from tensorcut.layers.tucker import TuckerConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1).to(dtype)
    x = torch.randn(2, 8, 9, 9, dtype=dtype)
    return conv, x, conv(x).detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_factorization_passes_with_tiny_output_error(dtype):
    conv, x, y = _setup(dtype)
    layer = TuckerConv2d.from_conv(conv)  # full ranks: exact
    chk = check_swap(conv, layer, x, y, chain=sum(layer.ranks) * 9)
    eps = torch.finfo(dtype).eps
    assert chk.ok and chk.reason == ""
    assert chk.output_error < 64 * math.sqrt(8 * 9 + sum(layer.ranks) * 9) * eps * 10


def test_truncated_factorization_records_its_output_error():
    conv, x, y = _setup()
    layer = TuckerConv2d.from_conv(conv, ranks=(3, 3))
    chk = check_swap(conv, layer, x, y)
    assert chk.ok
    expected = relative_difference(layer(x), y)
    assert chk.output_error == pytest.approx(expected, rel=1e-12) and 0.05 < chk.output_error < 1.5


def test_a_wrong_effective_kernel_is_caught():
    conv, x, y = _setup()
    wrong = nn.Conv2d(8, 12, 3, padding=1).double()  # another kernel than the module computes with
    layer = TuckerConv2d.from_conv(wrong)
    chk = check_swap(wrong, layer, x, y)
    assert not chk.ok and chk.output_error == math.inf
    assert chk.reason.startswith(
        "the module's output differs from a convolution with the kernel tensorcut read from it"
    )


def test_a_layer_that_does_not_compute_its_kernel_is_caught():
    conv, x, y = _setup()
    layer = TuckerConv2d.from_conv(conv)
    rec = layer.reconstruct_weight().detach().clone()
    with torch.no_grad():
        layer.last.weight.mul_(1.001)  # the sublayers now disagree with ...
    layer.reconstruct_weight = lambda: rec  # type: ignore[method-assign]  # ... the kernel the layer claims
    chk = check_swap(conv, layer, x, y)
    assert not chk.ok and "deviates from a convolution with its own kernel" in chk.reason


def test_capture_records_inputs_outputs_and_every_call():
    torch.manual_seed(0)
    shared = nn.Conv2d(3, 3, 3, padding=1)
    m = nn.Sequential(shared, nn.ReLU(inplace=True), shared, nn.ReLU(inplace=True))
    x = torch.randn(1, 3, 6, 5)
    cap = capture(m, [shared], (x,))
    assert cap.sizes[id(shared)] == [(6, 5), (6, 5)]
    assert torch.equal(cap.inputs[id(shared)], x)
    assert torch.equal(
        cap.outputs[id(shared)], shared(x)
    )  # a copy: the in-place ReLU did not change it


def test_capture_reports_a_failing_forward_in_one_line():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(TensorcutError) as e:
        capture(m, [], (torch.randn(2, 3, 10, 10),))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(
        "the model's forward failed on an input of shape (2, 3, 10, 10) (RuntimeError: "
    )
    assert msg.endswith("give the input_shape (C, H, W) or calibration batch the model expects")
