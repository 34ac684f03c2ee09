"""The one cost model: plan totals == summarize of the applied model == MACs actually executed."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tensorcut.layers  # noqa: F401  (registers the layer classes)
from tensorcut.compression import apply, plan
from tensorcut.compression.cost import conv_macs, model_cost
from tensorcut.geometry import SameConv2d
from tensorcut.layers.base import LAYER_REGISTRY, FactorizedConv2d
from tensorcut.layers.linear import SVDLinear
from tensorcut.summary import summarize

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = sorted(LAYER_REGISTRY)
SHAPE = (3, 20, 18)


class _Net(nn.Module):
    """Strided, padded, dilated, grouped, TF-same convs; a shared conv called twice; linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False)
        self.b = nn.Conv2d(24, 24, (3, 5), padding=(1, 2), dilation=(1, 1))
        self.shared = nn.Conv2d(24, 24, 3, padding=1)
        self.c = SameConv2d(24, 32, 3, stride=2)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=2)
        self.head = nn.Linear(32, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.b(torch.relu(self.a(x))))
        x = self.shared(torch.relu(self.shared(x)))
        x = torch.relu(self.g(torch.relu(self.c(x))))
        return self.head(x.mean((2, 3)))


def _executed_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every convolution and matrix product actually run, per image:
    FlopCounterMode counts 2 flops per multiply-accumulate for these operators."""
    ops = {"convolution", "mm", "addmm", "bmm", "baddbmm"}
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(x)
    counts = fc.get_flop_counts()["Global"]
    total = sum(
        v
        for k, v in counts.items()
        if str(k).split(".")[-1] in ops or getattr(k, "__name__", "") in ops
    )
    assert total % (2 * x.shape[0]) == 0
    return total // (2 * x.shape[0])


def test_conv_macs_closed_form():
    assert conv_macs(8, 3, (3, 3), (6, 6)) == 8 * 3 * 9 * 36


def test_dense_model_cost_equals_executed_macs():
    torch.manual_seed(0)
    m = _Net().eval()
    x = torch.randn(3, *SHAPE)
    c = model_cost(m, SHAPE)
    assert c.total_macs == _executed_macs(m, x) == summarize(m, SHAPE).total_macs
    shared = next(u for u in c.units if u.name == "shared")
    assert shared.calls == 2
    assert c.total_params == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_plan_totals_equal_summary_and_executed_macs(method):
    torch.manual_seed(0)
    m = _Net().eval()
    p = plan(
        m,
        method=method,
        ratio=0.5,
        input_shape=SHAPE,
        progress=False,
        filter_fn=lambda n, mod: True,
    )
    assert any(e.status == "factorize" for e in p.layers), p.table()
    apply(m, p)
    assert any(isinstance(x, FactorizedConv2d) for x in m.modules())
    t = p.totals()
    x = torch.randn(2, *SHAPE)
    s = summarize(m, SHAPE)
    assert t["model_params_after"] == s.total_params == sum(q.numel() for q in m.parameters())
    assert t["model_macs_after"] == s.total_macs == _executed_macs(m, x)


def test_svd_linear_counts():
    torch.manual_seed(0)
    lin = nn.Linear(12, 9)
    m = nn.Sequential(nn.Flatten(), SVDLinear.from_linear(lin, rank=4))
    c = model_cost(m, (3, 2, 2))
    assert c.total_macs == 4 * (12 + 9) == _executed_macs(m, torch.randn(5, 3, 2, 2))
