"""``summary.measure_model_latency`` (for ``inspect --latency``): the one timer, a compressed
model timed with its dense equivalent, the verdict's wording (a stubbed timer: no timed
assertions)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import tensorcut
import tensorcut.timing as timing
from tensorcut.errors import TensorcutError
from tensorcut.layers import FactorizedConv2d
from tensorcut.summary import _dense_equivalent, measure_model_latency

pytestmark = pytest.mark.filterwarnings("ignore")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
    ).eval()


def _stub(times: dict[str, list[float]]) -> Any:
    def fake(models: dict[str, Any], x: torch.Tensor, **kw: Any) -> dict[str, Any]:
        assert list(models) == list(times)
        return {
            n: timing.latency_stats(
                n, times[n], batch=int(x.shape[0]), threads=1, device="cpu", warmup=3, session=4
            )
            for n in models
        }

    return fake


def test_dense_model_is_timed_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "measure_latency", _stub({"model": [2.0, 2.0, 3.0]}))
    r = measure_model_latency(_net(), (3, 8, 8), batch=4)
    assert r.comparison is None and list(r.stats) == ["model"]
    assert r.lines() == [
        "latency, model: median 2.00 ms (IQR 2.00–2.50), batch 4, 1 thread, cpu, "
        "3 reps after 3 warm-up"
    ]
    assert r.to_dict()["stats"]["model"]["times_ms"] == [2.0, 2.0, 3.0]


def test_compressed_model_is_compared_with_its_dense_equivalent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small, _ = tensorcut.compress(
        _net(), method="tucker2", ratio=0.5, input_shape=(3, 8, 8), progress=False
    )
    assert any(isinstance(m, FactorizedConv2d) for m in small.modules())
    dense = _dense_equivalent(small)
    assert dense is not None and not any(isinstance(m, FactorizedConv2d) for m in dense.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want, got = small(x), dense(x)
    assert float((got - want).abs().max()) <= 1e3 * torch.finfo(torch.float32).eps * float(
        want.abs().max()
    )
    times = {"model": [1.0, 1.2, 0.9, 1.1], "dense equivalent": [1.1, 1.0, 1.0, 1.0]}
    monkeypatch.setattr(timing, "measure_latency", _stub(times))
    r = measure_model_latency(copy.deepcopy(small), (3, 8, 8))
    assert r.comparison is not None and not r.comparison.measurable
    assert r.lines()[-1].startswith(
        "latency, compressed vs dense equivalent: no measurable difference: model / dense "
        "equivalent = "
    )
    times = {"model": [0.5, 0.5, 0.5, 0.5], "dense equivalent": [1.0, 1.0, 1.0, 1.0]}
    monkeypatch.setattr(timing, "measure_latency", _stub(times))
    last = measure_model_latency(copy.deepcopy(small), (3, 8, 8)).lines()[-1]
    assert last.endswith("= 0.50x (spread 0.50–0.50): model is faster")


def test_bad_batch_refused() -> None:
    with pytest.raises(TensorcutError) as e:
        measure_model_latency(_net(), (3, 8, 8), batch=0)
    assert str(e.value) == "latency batch must be an integer >= 1, got 0"
