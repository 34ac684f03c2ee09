"""The latency timer: statistics on a fake clock, interleaving, thread restore, comparisons."""

from __future__ import annotations

import statistics

import pytest
import torch

from tensorcut.errors import TensorcutError
from tensorcut.timing import compare, latency_stats, measure_latency, quartiles


class FakeClock:
    """Advances only when a model runs: each model adds its own fixed duration (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _model(clock: FakeClock, durations: list[float], log: list[str], name: str):
    it = iter(durations)

    def run(x: torch.Tensor) -> torch.Tensor:
        log.append(name)
        clock.now += next(it)
        return x

    return run


def test_quartiles_match_inclusive_definition():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert quartiles(xs) == (2.0, 3.0, 4.0)
    assert quartiles([7.0]) == (7.0, 7.0, 7.0)
    ys = [1.0, 2.0, 3.0, 10.0]
    q = statistics.quantiles(ys, n=4, method="inclusive")
    assert quartiles(ys) == (q[0], q[1], q[2])
    with pytest.raises(TensorcutError):
        quartiles([])


def test_measure_latency_statistics_on_fake_clock():
    clock = FakeClock()
    log: list[str] = []
    # 2 warm-up calls (huge, must be discarded) then 5 timed calls per model
    a = _model(clock, [9.0, 9.0, 0.001, 0.002, 0.003, 0.004, 0.005], log, "a")
    b = _model(clock, [9.0, 9.0, 0.010, 0.010, 0.010, 0.010, 0.010], log, "b")
    out = measure_latency({"a": a, "b": b}, torch.zeros(4, 3), warmup=2, reps=5, clock=clock)
    sa, sb = out["a"], out["b"]
    assert sa.times_ms == pytest.approx((1.0, 2.0, 3.0, 4.0, 5.0))
    assert (sa.q1_ms, sa.median_ms, sa.q3_ms) == pytest.approx((2.0, 3.0, 4.0))
    assert sb.median_ms == pytest.approx(10.0) and sb.iqr_ms == pytest.approx(0.0)
    assert sa.batch == 4 and sa.device == "cpu" and sa.warmup == 2 and sa.reps == 5
    assert sa.threads == torch.get_num_threads()
    assert sa.session == sb.session != 0
    # interleaved, rotating order: a b | b a | a b ...
    assert log[:6] == ["a", "b", "b", "a", "a", "b"]
    assert len(log) == 14


def test_threads_set_during_and_restored_after():
    before = torch.get_num_threads()
    seen: list[int] = []
    out = measure_latency(
        {"m": lambda x: seen.append(torch.get_num_threads())},
        torch.zeros(1),
        threads=1,
        warmup=0,
        reps=2,
    )
    assert seen == [1, 1] and out["m"].threads == 1
    assert torch.get_num_threads() == before


def test_threads_restored_after_a_failing_model():
    before = torch.get_num_threads()

    def boom(x: torch.Tensor) -> None:
        raise RuntimeError("fails")

    with pytest.raises(RuntimeError):
        measure_latency({"m": boom}, torch.zeros(1), threads=1, warmup=0, reps=1)
    assert torch.get_num_threads() == before


def test_bad_arguments_refused():
    with pytest.raises(TensorcutError):
        measure_latency({}, torch.zeros(1))
    with pytest.raises(TensorcutError):
        measure_latency({"m": lambda x: x}, torch.zeros(1), reps=0)
    with pytest.raises(TensorcutError):
        measure_latency({"m": lambda x: x}, torch.zeros(1), threads=0)


def test_describe_names_median_iqr_batch_threads_device():
    s = latency_stats("m", [12.1, 12.3, 12.6], batch=1, threads=1, device="cpu", warmup=3)
    text = s.describe()
    assert text.startswith("median 12.3 ms (IQR 12.2–12.4")
    assert "batch 1, 1 thread, cpu" in text and "3 reps after 3 warm-up" in text
    assert "2 threads" in latency_stats("m", [1.0], batch=32, threads=2, device="cpu").describe()
    assert s.to_dict()["median_ms"] == pytest.approx(12.3)


def test_compare_unpaired_overlap_rule():
    a = latency_stats("a", [9.0, 10.0, 11.0], batch=1, threads=1, device="cpu")
    b = latency_stats("b", [10.0, 10.5, 11.0], batch=1, threads=1, device="cpu")
    c = compare(a, b)
    assert not c.paired and not c.measurable
    assert c.describe().startswith("no measurable difference")
    fast = latency_stats("f", [4.0, 5.0, 6.0], batch=1, threads=1, device="cpu")
    c2 = compare(fast, b)
    assert c2.measurable and c2.ratio == pytest.approx(5.0 / 10.5)
    assert c2.low == pytest.approx(4.5 / 10.75) and c2.high == pytest.approx(5.5 / 10.25)
    assert "faster" in c2.describe()
    assert "slower" in compare(b, fast).describe()


def test_compare_paired_uses_per_round_ratios():
    clock = FakeClock()
    log: list[str] = []
    # load drift: both slow down by the same factor each round; a is always half of b
    a = _model(clock, [0.001, 0.002, 0.004, 0.008], log, "a")
    b = _model(clock, [0.002, 0.004, 0.008, 0.016], log, "b")
    out = measure_latency({"a": a, "b": b}, torch.zeros(1), warmup=0, reps=4, clock=clock)
    c = compare(out["a"], out["b"])
    assert (
        c.paired
        and c.ratio == pytest.approx(0.5)
        and c.low == pytest.approx(0.5)
        and c.high == pytest.approx(0.5)
    )
    assert c.measurable
    # unpaired, the same numbers' IQRs overlap: the drift would hide the difference
    assert not compare(
        latency_stats("a", out["a"].times_ms, batch=1, threads=1, device="cpu"),
        latency_stats("b", out["b"].times_ms, batch=1, threads=1, device="cpu"),
    ).measurable
