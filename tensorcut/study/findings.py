"""Read sweep rows back as curves and summarise them.

The summaries are the tolerated norm loss and the accuracy at a given loss.

Used by the figures and by the paper-reproduction report, so both read the numbers the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any


@dataclass(frozen=True)
class Point:
    """One evaluated configuration on an accuracy-vs-norm-loss curve."""

    norm_loss: float
    top1: float
    top5: float
    loss: float
    keep: str
    corr_loss: float | None = None


def baselines(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """(fingerprint, split) -> baseline row."""
    return {(r["fingerprint"], r["split"]): r for r in rows if r["kind"] == "baseline"}


def curves(
    rows: Iterable[Mapping[str, Any]],
    *,
    kind: str,
    method: str,
    split: str,
    fingerprint: str | None = None,
    by: Sequence[str] = ("layer", "bipartition"),
    with_baseline: bool = True,
) -> dict[tuple[Any, ...], list[Point]]:
    """Group rows into curves sorted by norm loss.

    The unmodified model is the (0, baseline) point of every curve.
    """
    rows = list(rows)
    base = baselines(rows)
    out: dict[tuple[Any, ...], list[Point]] = defaultdict(list)
    fps: set[str] = set()
    for r in rows:
        if r["kind"] != kind or r["method"] != method or r["split"] != split:
            continue
        if fingerprint is not None and r["fingerprint"] != fingerprint:
            continue
        if r.get("norm_loss_pct") is None or r.get("top1") is None:
            continue
        fps.add(r["fingerprint"])
        out[tuple(r[c] for c in by)].append(
            Point(
                float(r["norm_loss_pct"]),
                float(r["top1"]),
                float(r["top5"]),
                float(r["loss"]),
                str(r["keep"]),
                r.get("corr_loss_pct"),
            )
        )
    for pts in out.values():
        if with_baseline and len(fps) == 1:
            b = base.get((next(iter(fps)), split))
            if b is not None:
                pts.append(
                    Point(0.0, float(b["top1"]), float(b["top5"]), float(b["loss"]), "full", 0.0)
                )
        pts.sort(key=lambda p: (p.norm_loss, -p.top1))
    return dict(out)


def accuracy_at(points: Sequence[Point], norm_loss: float, *, metric: str = "top1") -> float | None:
    """Accuracy linearly interpolated at ``norm_loss``; None outside the measured range."""
    pts = sorted(points, key=lambda p: p.norm_loss)
    if not pts or norm_loss < pts[0].norm_loss or norm_loss > pts[-1].norm_loss:
        return None
    for a, b in pairwise(pts):
        if a.norm_loss <= norm_loss <= b.norm_loss:
            if b.norm_loss == a.norm_loss:
                return float(getattr(a, metric))
            t = (norm_loss - a.norm_loss) / (b.norm_loss - a.norm_loss)
            return float(getattr(a, metric)) * (1 - t) + float(getattr(b, metric)) * t
    return float(getattr(pts[-1], metric))


def tolerated_norm_loss(
    points: Sequence[Point], baseline_top1: float, *, max_drop: float = 0.01, metric: str = "top1"
) -> float:
    """Largest norm loss % reached before accuracy drops more than ``max_drop`` below baseline.

    Walks the curve by increasing norm loss; at the first point beyond the allowed drop the
    crossing is linearly interpolated from the previous point. If no point crosses, the
    largest measured norm loss is returned (a lower bound).
    """
    pts = sorted(points, key=lambda p: p.norm_loss)
    floor = baseline_top1 - max_drop
    prev: Point | None = None
    for p in pts:
        acc = float(getattr(p, metric))
        if acc < floor:
            if prev is None:
                return 0.0
            a_prev = float(getattr(prev, metric))
            if a_prev == acc:
                return prev.norm_loss
            t = (a_prev - floor) / (a_prev - acc)
            return prev.norm_loss + t * (p.norm_loss - prev.norm_loss)
        prev = p
    return pts[-1].norm_loss if pts else 0.0


def recovery_curves(
    rows: Iterable[Mapping[str, Any]], *, split: str, fingerprint: str | None = None
) -> dict[str, list[tuple[int, float, float]]]:
    """Scenario -> [(epoch, top1, top5)] sorted by epoch."""
    out: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for r in rows:
        if r["kind"] != "recovery" or r["split"] != split:
            continue
        if fingerprint is not None and r["fingerprint"] != fingerprint:
            continue
        name = f"CP rank {r['keep_int']}" if r["method"] == "cp" else f"SVD {r['bipartition']}"
        out[name].append((int(r["epoch"]), float(r["top1"]), float(r["top5"])))
    return {k: sorted(v) for k, v in out.items()}


def splits_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Splits present, in first-seen order."""
    seen: list[str] = []
    for r in rows:
        if r["split"] not in seen:
            seen.append(r["split"])
    return seen


__all__ = [
    "Point",
    "baselines",
    "curves",
    "accuracy_at",
    "tolerated_norm_loss",
    "recovery_curves",
    "splits_of",
]
