"""Latency-targeted plans, on a deterministic fake timer (no timed assertions): candidates that are
not faster stay dense, the greedy allocation meets the target, a verified plan is never slower."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import tensorcut.compression.speed as speed
import tensorcut.compression.speed_plan as speed_plan
from tensorcut.compression import apply
from tensorcut.errors import TensorcutError
from tensorcut.layers.base import FactorizedConv2d
from tensorcut.timing import latency_stats

pytestmark = pytest.mark.usefixtures("one_thread")

OVERHEAD_MS = 0.4  # fake cost of one extra kernel call


def fake_ms(m: Any) -> float:
    """Deterministic 'latency': 1 ms per 10k parameters plus a fixed cost per convolution call."""
    if not isinstance(m, nn.Module):
        return 1.0
    params = sum(p.numel() for p in m.parameters())
    calls = sum(1 for s in m.modules() if isinstance(s, nn.Conv2d))
    return params / 1e4 + OVERHEAD_MS * calls


class FakeTimer:
    def __init__(self, whole_model_penalty: float = 0.0) -> None:
        self.calls = 0
        self.penalty = whole_model_penalty

    def __call__(
        self,
        models: dict[str, Any],
        example: torch.Tensor,
        *,
        threads: int | None = None,
        warmup: int = 0,
        reps: int = 5,
        **kw: Any,
    ) -> dict[str, Any]:
        self.calls += 1
        out = {}
        for n, m in models.items():
            ms = fake_ms(m)
            whole = isinstance(m, nn.Module) and any(isinstance(s, nn.Linear) for s in m.modules())
            if whole and any(isinstance(s, FactorizedConv2d) for s in m.modules()):
                ms += self.penalty
            out[n] = latency_stats(
                n,
                [ms] * reps,
                batch=int(example.shape[0]),
                threads=1,
                device="cpu",
                warmup=warmup,
                session=1000 + self.calls,
            )
        return out


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.tiny = nn.Conv2d(
            8, 16, 3, padding=1
        )  # factorizing it only adds kernel calls: never faster
        self.big1 = nn.Conv2d(16, 64, 3, padding=1)
        self.big2 = nn.Conv2d(64, 64, 3, padding=1)
        self.big3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.tiny(torch.relu(self.stem(x))))
        x = torch.relu(self.big3(torch.relu(self.big2(torch.relu(self.big1(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _plan(
    net: nn.Module,
    target: float,
    monkeypatch: pytest.MonkeyPatch,
    timer: FakeTimer | None = None,
    **kw: Any,
) -> Any:
    t = timer or FakeTimer()
    monkeypatch.setattr(speed_plan, "measure_latency", t)
    return speed.plan_for_speedup(net, target, (3, 8, 8), threads=1, reps=3, warmup=0, **kw)


def test_target_met_and_not_faster_layers_stay_dense(net, monkeypatch):
    p = _plan(net, 1.5, monkeypatch)
    sp = p.config["speed"]
    assert sp["met"] and sp["predicted_ms"] <= sp["dense_ms"] / 1.5 + 1e-9
    by = {e.name: e for e in p.layers}
    assert by["tiny"].status == "dense" and by["tiny"].reason == speed.NOT_FASTER
    assert "stem" not in by  # 3 input channels: not a candidate (default filter)
    fact = [e for e in p.layers if e.status == "factorize"]
    assert fact and all(e.latency_ms["factorized"] < e.latency_ms["dense"] for e in fact)
    saved = sum(e.latency_ms["dense"] - e.latency_ms["factorized"] for e in fact)
    assert sp["predicted_ms"] == pytest.approx(sp["dense_ms"] - saved)
    out = apply(_copy(net), p)
    assert sum(isinstance(m, FactorizedConv2d) for m in out.modules()) == len(fact)


def _copy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


def test_mild_target_compresses_less(net, monkeypatch):
    mild = _plan(net, 1.05, monkeypatch)
    strong = _plan(net, 2.0, monkeypatch)
    err = lambda p: sum((e.error or 0.0) ** 2 for e in p.layers if e.status == "factorize")  # noqa: E731
    assert mild.config["speed"]["predicted_ms"] >= strong.config["speed"]["predicted_ms"]
    assert err(mild) <= err(strong)


def test_unreachable_target_says_so(net, monkeypatch):
    p = _plan(net, 1000.0, monkeypatch)
    assert not p.config["speed"]["met"] and p.config["speed"]["predicted_speedup"] < 1000


def test_verify_falls_back_to_dense_when_whole_model_is_slower(net, monkeypatch):
    p = _plan(net, 1.5, monkeypatch, FakeTimer(whole_model_penalty=1e6), verify=True)
    assert p.config["speed"]["fell_back_to_dense"]
    assert all(e.status == "dense" for e in p.layers)
    assert apply(_copy(net), p).big2 is not None and not any(
        isinstance(m, FactorizedConv2d) for m in apply(_copy(net), p).modules()
    )


def test_verify_keeps_a_faster_plan(net, monkeypatch):
    p = _plan(net, 1.5, monkeypatch, verify=True)
    assert "fell_back_to_dense" not in p.config["speed"]
    assert p.config["speed"]["measured_speedup"] > 1


def test_cache_skips_remeasuring_layers(net, monkeypatch, tmp_path):
    path = tmp_path / "lat.json"
    t1 = FakeTimer()
    a = _plan(net, 1.5, monkeypatch, t1, cache=path)
    assert path.exists()
    t2 = FakeTimer()
    b = _plan(net, 1.5, monkeypatch, t2, cache=path)
    assert t2.calls == 1 < t1.calls  # only the whole dense model is timed again
    assert [e.ranks for e in a.layers] == [e.ranks for e in b.layers]
    path.write_text("{}")
    with pytest.raises(TensorcutError):
        _plan(net, 1.5, monkeypatch, cache=path)


def test_bad_arguments_refused(net, monkeypatch):
    with pytest.raises(TensorcutError):
        _plan(net, 0.5, monkeypatch)
    with pytest.raises(TensorcutError):
        _plan(net, 1.5, monkeypatch, method="nope")
    with pytest.raises(TensorcutError):
        _plan(net, 1.5, monkeypatch, layers=["missing"])


# ----------------------------------------------------------------------------- CompressConfig


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"target_speedup": 1.0},
            "target_speedup must be a number > 1 (e.g. 1.5 for 1.5x faster), got 1.0",
        ),
        (
            {"target_speedup": "2"},
            "target_speedup must be a number > 1 (e.g. 1.5 for 1.5x faster), got '2'",
        ),
        (
            {"target_speedup": True},
            "target_speedup must be a number > 1 (e.g. 1.5 for 1.5x faster), got True",
        ),
        (
            {"target_speedup": float("inf")},
            "target_speedup must be a number > 1 (e.g. 1.5 for 1.5x faster), got inf",
        ),
        (
            {"target_speedup": float("nan")},
            "target_speedup must be a number > 1 (e.g. 1.5 for 1.5x faster), got nan",
        ),
        (
            {"target_speedup": 1.5, "ratio": 0.5},
            "contradictory rank options: target_speedup and ratio; give one of them",
        ),
        (
            {"target_speedup": 1.5, "budget": 0.5},
            "contradictory rank options: target_speedup and budget; give one of them",
        ),
        (
            {"target_speedup": 1.5, "method": "auto"},
            "target_speedup times one method's layers; name it (e.g. method='tucker2'), not 'auto'",
        ),
    ],
)
def test_config_target_speedup_refused(kw: dict[str, Any], message: str) -> None:
    from tensorcut.compression import CompressConfig

    with pytest.raises(TensorcutError) as e:
        CompressConfig(**kw)
    assert str(e.value) == message


def test_config_target_speedup_is_the_rule_and_round_trips() -> None:
    from tensorcut.compression import CompressConfig

    cfg = CompressConfig(target_speedup=2)
    assert cfg.target_speedup == 2.0 and isinstance(cfg.target_speedup, float)
    assert cfg.rule.kind == "none" and cfg.budget is None
    assert CompressConfig(**cfg.to_dict()) == cfg


def test_compress_with_target_speedup_plans_for_speed(net, monkeypatch):
    import tensorcut

    timer = FakeTimer()
    monkeypatch.setattr(speed_plan, "measure_latency", timer)
    model, p = tensorcut.compress(
        _copy(net), method="tucker2", target_speedup=1.5, input_shape=(3, 8, 8), progress=False
    )
    assert p.config["target_speedup"] == 1.5 and p.config["method"] == "tucker2"
    assert p.config["align"] == 8  # align 1 (the default) times multiples of 8
    sp = p.config["speed"]
    assert sp["met"] and sp["target_speedup"] == 1.5
    assert {"dense_ms", "predicted_ms", "measured_ms", "measured_speedup", "measured"} <= set(sp)
    assert "fell_back_to_dense" not in sp and sp["measured_speedup"] > 1
    by = {e.name: e for e in p.layers}
    assert by["tiny"].status == "dense" and by["tiny"].reason == speed.NOT_FASTER
    fact = [e.name for e in p.layers if e.status == "factorize"]
    assert fact and all(isinstance(model.get_submodule(n), FactorizedConv2d) for n in fact)
    assert all(r % 8 == 0 for n in fact for r in by[n].ranks)
    assert p.model_output_error is not None  # compress's whole-model check ran
    assert tensorcut.Plan.from_dict(p.to_dict()).config["speed"] == sp  # JSON round trip


def test_compress_with_target_speedup_never_slower_than_dense(net, monkeypatch):
    import tensorcut

    monkeypatch.setattr(speed_plan, "measure_latency", FakeTimer(whole_model_penalty=1e6))
    model, p = tensorcut.compress(
        _copy(net), target_speedup=1.5, input_shape=(3, 8, 8), progress=False
    )
    assert p.config["speed"]["fell_back_to_dense"]
    assert not any(isinstance(m, FactorizedConv2d) for m in model.modules())
    text = speed.describe_speed(p.config["speed"])
    assert "not measurably faster than dense here: every layer kept dense" in text


def test_target_speedup_with_sensitivity_refused(net):
    import tensorcut

    with pytest.raises(TensorcutError) as e:
        tensorcut.plan(net, target_speedup=1.5, input_shape=(3, 8, 8), sensitivity={"big1": 2.0})
    assert str(e.value) == (
        "sensitivity guides a budget's allocation, not a target_speedup plan; drop one of them"
    )


def test_describe_speed_says_how_it_was_measured() -> None:
    sp = {
        "target_speedup": 1.5,
        "dense_ms": 3.0,
        "predicted_ms": 1.9,
        "predicted_speedup": 3.0 / 1.9,
        "met": True,
        "threads": 1,
        "batch": 1,
        "device": "cpu",
        "channels_last": True,
        "measured": "dense: median 3.00 ms\ncompressed: median 2.00 ms\nverdict",
    }
    lines = speed.describe_speed(sp).splitlines()
    assert lines[0] == (
        "speed target 1.5x (1 thread, batch 1, cpu, channels-last): dense median 3.000 ms, "
        "predicted 1.900 ms (1.58x, target met)"
    )
    assert lines[1:] == [
        "measured whole model, interleaved with dense:",
        "  dense: median 3.00 ms",
        "  compressed: median 2.00 ms",
        "  verdict",
    ]
    sp.update(met=False, threads=2)
    assert "(2 threads, batch 1" in speed.describe_speed(sp)
    assert "target not reached: no faster forms left)" in speed.describe_speed(sp)


# ----------------------------------------------------------------------------- method contract


def test_candidate_ranks_scale_each_methods_reference_ranks() -> None:
    from tensorcut.compression.rank import scaled_ranks
    from tensorcut.geometry import ConvGeometry
    from tensorcut.layers import get_method

    conv = nn.Conv2d(64, 64, 3, padding=1)
    g = ConvGeometry.from_conv(conv)
    for method in ("cp", "tucker2"):
        ref = get_method(method).reference_ranks(g)
        got = speed_plan._candidate_ranks(method, g, (8, 8), (0.5,), 1)
        assert got == [tuple(scaled_ranks(ref, 0.5))]
    (cp_ref,) = get_method("cp").reference_ranks(g)
    assert cp_ref == 64 * 64 * 9 // (64 + 64 + 3 + 3)  # the MAC-equal rank, not CP's maximum


def test_error_uses_the_methods_bound_else_measures() -> None:
    from tensorcut.geometry import ConvGeometry
    from tensorcut.layers import get_method

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    g = ConvGeometry.from_conv(conv)
    cache: dict[str, Any] = {}
    got = speed_plan._error(conv, "tucker2", (8, 8), cache)
    assert got == get_method("tucker2").error_bound(conv.weight, g, (8, 8), {})
    assert set(cache) == {"out", "in"}  # spectra kept for the next ranks of this layer
    # a grouped kernel has no Tucker-2 bound: the decomposition is made and measured
    grouped = nn.Conv2d(16, 24, 3, padding=1, groups=2)
    layer = get_method("tucker2").from_conv(grouped, ranks=(4, 4))
    w = grouped.weight.detach().double()
    want = float(torch.linalg.vector_norm(w - layer.reconstruct_weight().detach().double()))
    want /= float(torch.linalg.vector_norm(w))
    assert speed_plan._error(grouped, "tucker2", (4, 4), {}) == pytest.approx(want, rel=1e-5)
