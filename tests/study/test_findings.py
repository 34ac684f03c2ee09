"""Reading curves back: interpolation and tolerated norm loss."""

from __future__ import annotations

import pytest

from tensorcut.study.findings import Point, accuracy_at, tolerated_norm_loss


def _pts(*pairs: tuple[float, float]) -> list[Point]:
    return [Point(n, a, 1.0, 0.0, str(i)) for i, (n, a) in enumerate(pairs)]


def test_accuracy_at_interpolates_inside_range_only() -> None:
    pts = _pts((0.0, 0.9), (20.0, 0.8), (40.0, 0.4))
    assert accuracy_at(pts, 10.0) == pytest.approx(0.85)
    assert accuracy_at(pts, 40.0) == pytest.approx(0.4)
    assert accuracy_at(pts, 50.0) is None


def test_tolerated_norm_loss() -> None:
    pts = _pts((0.0, 0.90), (20.0, 0.895), (40.0, 0.85), (60.0, 0.2))
    # floor 0.88 crossed between 20 (0.895) and 40 (0.85): 20 + 20 * 0.015 / 0.045
    assert tolerated_norm_loss(pts, 0.90, max_drop=0.02) == pytest.approx(20 + 20 * 0.015 / 0.045)
    assert tolerated_norm_loss(pts, 0.90, max_drop=0.9) == 60.0  # never crosses: largest measured
    assert tolerated_norm_loss(_pts((5.0, 0.1)), 0.9) == 0.0
