"""The multiple-choice knapsack behind the measured allocation (``compression/knapsack.py``):
exact on small tables (checked against brute force), within the budget, and refusals."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from tensorcut.compression.knapsack import solve_mckp
from tensorcut.errors import TensorcutError


def _brute(groups, budget):
    """(least total value, its cost) over every choice that fits, or None."""
    best = None
    for ch in itertools.product(*[range(len(g)) for g in groups]):
        c = sum(groups[k][i][0] for k, i in enumerate(ch))
        v = sum(groups[k][i][1] for k, i in enumerate(ch))
        if c <= budget and (best is None or v < best[0] - 1e-12):
            best = (v, c)
    return best


def _totals(groups, choice):
    cost = sum(groups[k][i][0] for k, i in enumerate(choice))
    return sum(groups[k][i][1] for k, i in enumerate(choice)), cost


@pytest.mark.parametrize("seed", range(8))
def test_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        groups = [
            [(int(rng.integers(0, 20)), float(rng.random())) for _ in range(rng.integers(1, 5))]
            for _ in range(rng.integers(1, 5))
        ]
        budget = int(rng.integers(0, 60))
        got = solve_mckp(groups, budget)
        want = _brute(groups, budget)
        if want is None:
            assert got is None
            continue
        value, cost = _totals(groups, got)
        assert cost <= budget
        assert value == pytest.approx(want[0], abs=1e-9)


def test_dense_kept_where_it_is_cheapest_in_value_per_cost():
    # layer a: dense (cost 10, value 0) or 5 at a large value; layer b: cheap compression
    groups = [[(10, 0.0), (5, 1.0)], [(10, 0.0), (5, 0.01), (2, 0.02)]]
    assert solve_mckp(groups, 12) == [0, 2]
    assert solve_mckp(groups, 20) == [0, 0]  # everything fits dense: nothing is compressed
    assert solve_mckp(groups, 7) == [1, 2]


def test_ties_go_to_the_cheaper_choice():
    assert solve_mckp([[(10, 0.0), (4, 0.0)]], 10) == [1]


def test_infeasible_budget_gives_none():
    assert solve_mckp([[(10, 0.0), (5, 1.0)], [(3, 0.0)]], 7) is None
    assert solve_mckp([], 0) == []


@pytest.mark.parametrize(
    "groups",
    [[[]], [[(-1, 0.0)]], [[(1, float("nan"))]], [[(float("inf"), 0.0)]]],
)
def test_bad_tables_are_one_line_errors(groups):
    with pytest.raises(TensorcutError) as e:
        solve_mckp(groups, 10)
    assert "\n" not in str(e.value)


def test_a_resnet_sized_table_is_fast():
    # 18 layers x (dense + 10 rungs), costs ~1.8 M MACs: the benchmark's size
    rng = np.random.default_rng(0)
    fr = (0.75, 0.6, 0.5, 0.4, 0.32, 0.25, 0.2, 0.15, 0.1, 0.06)
    groups = [
        [(1_800_000, 0.0)] + [(int(1_800_000 * f), float(rng.random() * (1 - f))) for f in fr]
        for _ in range(18)
    ]
    t = time.perf_counter()
    choice = solve_mckp(groups, 18 * 1_800_000 / 4)
    assert time.perf_counter() - t < 2.0
    assert choice is not None and _totals(groups, choice)[1] <= 18 * 1_800_000 / 4
