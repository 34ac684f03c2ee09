"""The one latency timer: warm-up, interleaved runs, median and interquartile range.

Every latency tensorcut reports (the benchmark, the speed planner, reports) comes from
:func:`measure_latency`. Models are timed *interleaved*: each round runs every model once, in an
order that rotates from round to round, so a change in machine load during the measurement hits
all of them alike. The statistics are the median and the interquartile range (IQR, the 25th to
75th percentile, ``statistics.quantiles(method="inclusive")``) of the per-call wall times; the
thread count, batch size and device are recorded with them.

:func:`compare` turns two measurements into a ratio with a spread and says "no measurable
difference" when that spread contains 1 (see its docstring for the exact rule).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from tensorcut.errors import TensorcutError

__all__ = [
    "Comparison",
    "LatencyStats",
    "compare",
    "latency_stats",
    "measure_latency",
    "quartiles",
    "to_memory_format",
]

Clock = Callable[[], float]
ModuleT = TypeVar("ModuleT", bound=nn.Module)

_session_counter = itertools.count(1)


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(Q1, median, Q3) of ``xs`` by linear interpolation between order statistics
    (``statistics.quantiles(method="inclusive")``; one value gives that value three times)."""
    if not xs:
        raise TensorcutError("no timings to summarise; measure at least one repetition")
    if len(xs) == 1:
        return (float(xs[0]),) * 3
    q1, q2, q3 = statistics.quantiles([float(x) for x in xs], n=4, method="inclusive")
    return q1, q2, q3


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latencies of one model, in milliseconds, and how they were measured."""

    name: str
    times_ms: tuple[float, ...]
    batch: int
    threads: int
    device: str
    warmup: int
    session: int = (
        0  # measurements from one measure_latency call share it (their rounds are paired)
    )
    median_ms: float = field(init=False)
    q1_ms: float = field(init=False)
    q3_ms: float = field(init=False)

    def __post_init__(self) -> None:
        q1, med, q3 = quartiles(self.times_ms)
        object.__setattr__(self, "q1_ms", q1)
        object.__setattr__(self, "median_ms", med)
        object.__setattr__(self, "q3_ms", q3)

    @property
    def reps(self) -> int:
        """Timed repetitions (after warm-up)."""
        return len(self.times_ms)

    @property
    def iqr_ms(self) -> float:
        """Interquartile range (Q3 - Q1) in milliseconds."""
        return self.q3_ms - self.q1_ms

    def describe(self) -> str:
        """One line.

        E.g. ``median 12.3 ms (IQR 12.1–12.6), batch 1, 1 thread, cpu, 15 reps after 3 warm-up``.
        """
        th = f"{self.threads} thread" + ("" if self.threads == 1 else "s")
        return (
            f"median {_ms(self.median_ms)} ms (IQR {_ms(self.q1_ms)}–{_ms(self.q3_ms)}), "
            f"batch {self.batch}, "
            f"{th}, {self.device}, {self.reps} reps after {self.warmup} warm-up"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (raw times included)."""
        d = asdict(self)
        d["times_ms"] = list(self.times_ms)
        d["reps"] = self.reps
        return d


def to_memory_format(
    module: ModuleT, memory_format: torch.memory_format = torch.channels_last
) -> ModuleT:
    """``module`` with its 4-D parameters and buffers in ``memory_format`` (in place; returned).

    Timed and inference models are converted here: channels-last is the fast layout on CPU.
    """
    # torch's stubs omit the `memory_format` keyword that nn.Module.to accepts at runtime
    return module.to(memory_format=memory_format)  # type: ignore[call-overload]


def _ms(x: float) -> str:
    """Three significant figures, at least one decimal."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def latency_stats(
    name: str,
    times_ms: Sequence[float],
    *,
    batch: int,
    threads: int,
    device: str,
    warmup: int = 0,
    session: int = 0,
) -> LatencyStats:
    """A :class:`LatencyStats` from raw per-call times (e.g. from another runtime's own timer)."""
    return LatencyStats(
        name, tuple(float(t) for t in times_ms), batch, threads, device, warmup, session
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    models: Mapping[str, Callable[[torch.Tensor], Any]],
    example: torch.Tensor,
    *,
    threads: int | None = None,
    warmup: int = 3,
    reps: int = 15,
    clock: Clock = time.perf_counter,
) -> dict[str, LatencyStats]:
    """Time each of ``models`` (modules or any callables) on ``example``, interleaved.

    ``warmup`` rounds are run and discarded, then ``reps`` timed rounds; each round calls every
    model once, the order rotating by one per round. Calls run under ``torch.inference_mode()``;
    on CUDA the device is synchronised around each call. ``threads`` sets torch's intra-op
    threads for the measurement (restored afterwards); None uses the current setting, which is
    recorded. ``clock`` returns seconds (injectable for tests). Returns one
    :class:`LatencyStats` per name; all share one ``session`` so :func:`compare` pairs their rounds.
    """
    if not models:
        raise TensorcutError("nothing to time: pass at least one model")
    if reps < 1 or warmup < 0:
        raise TensorcutError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    if threads is not None and threads < 1:
        raise TensorcutError(f"threads must be >= 1, got {threads}")
    names = list(models)
    device = example.device
    batch = int(example.shape[0]) if example.dim() > 0 else 1
    before = torch.get_num_threads()
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used = torch.get_num_threads()
        with torch.inference_mode():
            for r in range(warmup + reps):
                k = r % len(names)
                for n in names[k:] + names[:k]:
                    fn = models[n]
                    _sync(device)
                    t0 = clock()
                    fn(example)
                    _sync(device)
                    t1 = clock()
                    if r >= warmup:
                        times[n].append((t1 - t0) * 1e3)
    finally:
        torch.set_num_threads(before)
    session = next(_session_counter)
    return {
        n: LatencyStats(n, tuple(times[n]), batch, used, device.type, warmup, session)
        for n in names
    }


@dataclass(frozen=True)
class Comparison:
    """``a`` relative to ``b``: the latency ratio a/b with its spread."""

    a: str
    b: str
    ratio: float  # median of a / median of b (paired: median of per-round ratios)
    low: float  # lower end of the ratio's spread
    high: float  # upper end
    paired: bool

    @property
    def measurable(self) -> bool:
        """False when the spread contains 1: the two are not told apart."""
        return not (self.low <= 1.0 <= self.high)

    def describe(self) -> str:
        """One line: the ratio and spread, or "no measurable difference"."""
        spread = f"{self.low:.2f}–{self.high:.2f}"
        if not self.measurable:
            return (
                f"no measurable difference: {self.a} / {self.b} = {self.ratio:.2f}x "
                f"(spread {spread})"
            )
        word = "faster" if self.ratio < 1 else "slower"
        return f"{self.a} / {self.b} = {self.ratio:.2f}x (spread {spread}): {self.a} is {word}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        d = asdict(self)
        d["measurable"] = self.measurable
        return d


def compare(a: LatencyStats, b: LatencyStats) -> Comparison:
    """The latency ratio ``a / b`` with its spread, and whether the difference is measurable.

    Paired (same :func:`measure_latency` call, same number of rounds): the ratio is the median of
    the per-round ratios ``a_i / b_i`` and the spread is their IQR, so load drift that hits both
    runs of a round cancels. Unpaired: the ratio of medians, spread ``[Q1_a / Q3_b, Q3_a / Q1_b]``,
    which contains 1 exactly when the two IQRs overlap. Either way "no measurable difference"
    means the spread contains 1.
    """
    if a.session and a.session == b.session and a.reps == b.reps:
        rs = [x / y for x, y in zip(a.times_ms, b.times_ms, strict=True)]
        lo, med, hi = quartiles(rs)
        return Comparison(a.name, b.name, med, lo, hi, True)
    return Comparison(
        a.name, b.name, a.median_ms / b.median_ms, a.q1_ms / b.q3_ms, a.q3_ms / b.q1_ms, False
    )
