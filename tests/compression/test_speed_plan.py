"""The speed rule's pieces: options refused in one line, the rank multiple it uses, the
whole-model copy it times equals the applied plan, and layers the method refuses stay dense with
the method's reason (a fake timer: no timed assertions)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import tensorcut
import tensorcut.compression.speed_plan as sp
from tensorcut.compression import CompressConfig, Plan, apply
from tensorcut.errors import TensorcutError
from tensorcut.layers import FactorizedConv2d
from tensorcut.timing import latency_stats

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise: Tucker-2 refuses it
        self.a = nn.Conv2d(16, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.stem(x))))
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def fake_timer(models: dict[str, Any], example: torch.Tensor, **kw: Any) -> dict[str, Any]:
    """Fewer parameters run faster; deterministic."""
    reps = kw.get("reps", 3)
    return {
        n: latency_stats(
            n,
            [sum(p.numel() for p in m.parameters()) / 1e4] * reps,
            batch=int(example.shape[0]),
            threads=1,
            device="cpu",
            session=11,
        )
        for n, m in models.items()
    }


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"batch": 0}, "speed option batch must be an integer >= 1, got 0"),
        ({"reps": 2.5}, "speed option reps must be an integer >= 1, got 2.5"),
        ({"warmup": -1}, "speed option warmup must be an integer >= 0, got -1"),
        ({"threads": 0}, "speed option threads must be >= 1 or None, got 0"),
        ({"scales": (0.5, 1.5)}, "speed option scales must be fractions in (0, 1], got [0.5, 1.5]"),
    ],
)
def test_speed_options_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(TensorcutError) as e:
        sp.SpeedOptions(**kw)
    assert str(e.value) == message


def test_speed_align_defaults_to_8() -> None:
    assert sp.speed_align(CompressConfig(target_speedup=1.5)) == 8
    assert sp.speed_align(CompressConfig(target_speedup=1.5, align=16)) == 16


def test_timed_copy_computes_what_apply_gives(net: Net) -> None:
    p = tensorcut.plan(net, ratio=0.5, input_shape=(3, 8, 8), progress=False)
    assert any(e.status == "factorize" for e in p.layers)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        want = apply(copy.deepcopy(net), p)(x)
        got = sp._compressed_copy(net, p)(x)  # the layers the plan built
        loaded = Plan.from_dict(p.to_dict())  # no built layers: rebuilt from the kernels
        rebuilt = sp._compressed_copy(net, loaded)(x)
    tol = 100 * torch.finfo(torch.float32).eps * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol
    assert float((rebuilt - want).abs().max()) <= tol
    assert not any(isinstance(m, FactorizedConv2d) for m in net.modules())  # model untouched


def test_layers_the_method_refuses_stay_dense_with_its_reason(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sp, "measure_latency", fake_timer)
    p = tensorcut.plan(
        net,
        target_speedup=1.2,
        input_shape=(3, 8, 8),
        progress=False,
        speed=sp.SpeedOptions(reps=3, warmup=0),
    )
    by = {e.name: e for e in p.layers}
    assert by["dw"].status == "dense" and by["dw"].reason.startswith("tucker2: ")
    assert "depthwise" in by["dw"].reason
    rec = p.config["speed"]
    assert rec["align"] == p.config["align"] == 8 and rec["batch"] == 1
    assert "measured" in rec  # verified by default
    fact = [e for e in p.layers if e.status == "factorize"]
    assert fact and all(e.latency_ms and "factorized" in e.latency_ms for e in fact)


class DriftingTimer:
    """``fake_timer`` with every session's times multiplied by its own factor: the load on a
    shared machine drifting between sessions (``factors[0]``: the first measurement reads high,
    as the planner's dense reading once did: 9.4 ms vs 6.15 ms when re-measured interleaved)."""

    def __init__(self, factors: list[float]) -> None:
        self.factors = factors
        self.sessions: list[list[str]] = []

    def __call__(self, models: dict[str, Any], example: torch.Tensor, **kw: Any) -> dict[str, Any]:
        f = self.factors[len(self.sessions) % len(self.factors)]
        self.sessions.append(list(models))
        return {
            n: latency_stats(
                n,
                [x * f for x in s.times_ms],
                batch=s.batch,
                threads=1,
                device="cpu",
                session=len(self.sessions),
            )
            for n, s in fake_timer(models, example, **kw).items()
        }


@pytest.mark.parametrize("factors", [[1.5, 1.0], [3.0, 1.0, 0.7, 1.2, 2.0]])
def test_prediction_not_skewed_by_a_slow_first_or_drifting_measurement(
    net: Net, monkeypatch: pytest.MonkeyPatch, factors: list[float]
) -> None:
    def run(timer: DriftingTimer) -> dict[str, Any]:
        monkeypatch.setattr(sp, "measure_latency", timer)
        p = tensorcut.plan(
            net,
            target_speedup=1.3,
            input_shape=(3, 8, 8),
            progress=False,
            speed=sp.SpeedOptions(reps=3, warmup=0, verify=False),
        )
        rec = p.config["speed"]
        rec["ranks"] = {e.name: e.ranks for e in p.layers}
        return rec

    steady = run(DriftingTimer([1.0]))
    timer = DriftingTimer(factors)
    drifting = run(timer)
    assert len(timer.sessions) >= 3  # the layers' sessions and the whole model's
    # the whole dense model is timed in one session with each dense layer, not alone
    whole = [s for s in timer.sessions if "model" in s]
    assert len(whole) == 1 and {"layer:a", "layer:b"} <= set(whole[0])
    assert drifting["predicted_speedup"] == pytest.approx(steady["predicted_speedup"], rel=1e-9)
    assert drifting["ranks"] == steady["ranks"]
    assert steady["predicted_speedup"] > 1.0
