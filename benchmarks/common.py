"""Shared helpers for bench_decompose.py, bench_layer_latency.py and bench_thesis_tables.py.

Machine information (including how loaded the CPU was while a benchmark ran), one thread
count for torch *and* the BLAS that numpy uses, interleaved (round-robin) timing, atomic
JSON writes, and a small markdown writer that puts the exact command at the top.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- threads


_POOL_LIMIT: Any = None


def pin_threads(n: int) -> None:
    """Use ``n`` threads in torch (intra-op) and in numpy's BLAS (via threadpoolctl when present).

    Both libraries compared in a benchmark then run with the same thread count.
    """
    global _POOL_LIMIT
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        _POOL_LIMIT = threadpool_limits(limits=n)  # kept alive for the whole run
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass


# ----------------------------------------------------------------------------- machine


class LoadMonitor:
    """Samples the 1-minute load average every ``every`` seconds in a daemon thread."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self) -> LoadMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def summary(self) -> dict[str, Any]:
        s = self.samples or [os.getloadavg()[0]]
        return {
            "load1_min": round(min(s), 2),
            "load1_mean": round(statistics.fmean(s), 2),
            "load1_max": round(max(s), 2),
            "samples": len(s),
            "cpus": os.cpu_count(),
        }


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except Exception:  # noqa: BLE001 - optional comparison libraries
        return None
    return str(getattr(m, "__version__", "?"))


def uptime_line() -> str:
    """What ``uptime`` prints (falls back to the load averages)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info(threads: int) -> dict[str, Any]:
    """Where and with what the benchmark ran."""
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "nice": os.nice(0),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tensorly": _version("tensorly"),
        "tltorch": _version("tltorch"),
        "numpy": _version("numpy"),
        "git_commit": _git_commit(),
        "uptime_at_start": uptime_line(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def command_line() -> str:
    """The command that started this process, as one would type it from the repository root."""
    exe = sys.executable
    try:
        exe = os.path.relpath(exe, ROOT) if Path(exe).resolve().is_relative_to(ROOT) else exe
    except ValueError:
        pass
    script = os.path.relpath(Path(sys.argv[0]).resolve(), ROOT)
    cmd = " ".join(shlex.quote(a) for a in [exe, script, *sys.argv[1:]])
    n = os.nice(0)
    return (f"nice -n {n} " if n > 0 else "") + cmd


# ----------------------------------------------------------------------------- timing


def interleaved_times(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 2,
    max_seconds: float | None = None,
) -> dict[str, list[float]]:
    """Time every callable once per round, round-robin (the order rotates each round).

    Background load then hits all variants alike. Returns seconds per call, per name.
    ``max_seconds`` stops early (after at least 3 rounds) when the budget is spent.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    t_start = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t)
        if max_seconds is not None and r >= 2 and time.perf_counter() - t_start > max_seconds:
            break
    return out


def stats(ts: Sequence[float]) -> dict[str, float]:
    """Median, min, interquartile range (seconds) and the number of samples."""
    s = sorted(ts)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "min": s[0], "q1": q[0], "q3": q[2], "n": len(s)}


# ----------------------------------------------------------------------------- files


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temporary file + rename), so a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def md_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = [
        "| " + " | ".join(str(h) for h in head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(
    path: Path,
    title: str,
    command: str,
    body: str,
    machine: dict[str, Any],
    load: dict[str, Any] | None,
) -> None:
    """Markdown report: title, the exact command, the machine and its load, then ``body``."""
    lines = [f"# {title}", "", "Command (from the repository root):", "", "```", command, "```", ""]
    m = machine
    lines.append(
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['threads']} thread(s) for torch and BLAS, nice "
        f"{m['nice']}; python {m['python']}, torch {m['torch']}, tensorly {m['tensorly']}, "
        f"tensorly-torch {m['tltorch']}; commit {m['git_commit']}; started {m['started']}."
    )
    lines.append("")
    lines.append(f"`uptime` at start: `{m['uptime_at_start']}`")
    if load:
        lines.append(
            f"1-minute load average during the run: min {load['load1_min']}, mean "
            f"{load['load1_mean']}, max {load['load1_max']} ({load['samples']} samples) on "
            f"{load['cpus']} CPUs."
        )
    lines += ["", body.rstrip(), ""]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def finish_report(
    result: dict[str, Any],
    out: Path,
    title: str,
    t_start: float,
    machine: dict[str, Any],
    targets: Callable[[dict[str, Any]], Any],
    render: Callable[[dict[str, Any]], str],
) -> None:
    """The end of a benchmark run: uptime, wall time and targets into ``result``, then
    ``out``.json and ``out``.md (``render(result)`` as the body)."""
    result["uptime_at_end"] = uptime_line()
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    result["targets"] = targets(result)
    write_json(out.with_suffix(".json"), result)
    write_markdown(
        out.with_suffix(".md"), title, result["command"], render(result), machine, result["load"]
    )
    print(f"wrote {out.with_suffix('.json')} and .md in {result['total_seconds']} s")


def fmt(x: float | None, digits: int = 4) -> str:
    """Compact number for tables ('-' for None)."""
    if x is None:
        return "-"
    if isinstance(x, float) and (x != x):
        return "nan"
    return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:,.0f}"
