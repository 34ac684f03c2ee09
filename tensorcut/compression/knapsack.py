"""Multiple-choice knapsack: pick one option per group, least summed value within a cost budget.

Used by the measured allocation (:mod:`tensorcut.compression.measured`): each group is a layer,
each option one way to keep it (dense, or a method at some ranks) with its cost (MACs or
parameters) and its measured accuracy cost (loss increase or top-1 drop). The solver is exact:
a dynamic programme over the Pareto frontier of (cost, value) of the groups seen so far, with
dominated partial choices dropped and partial choices that cannot fit the budget pruned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tensorcut.errors import TensorcutError

__all__ = ["solve_mckp"]

#: above this many partial choices on the frontier the solver refuses rather than run out of memory
MAX_FRONTIER = 2_000_000


def solve_mckp(groups: Sequence[Sequence[tuple[float, float]]], budget: float) -> list[int] | None:
    """The choice of one option per group with the least total value whose total cost fits.

    Exact (not a Lagrangian relaxation): the Pareto frontier of (total cost, total value) over
    the groups seen so far is extended one group at a time; a partial choice is kept only when
    no other is both cheaper (or as cheap) and better, and only when the cheapest completion
    still fits ``budget``. Ties in value go to the cheaper choice.

    Args:
        groups: per group, its options as ``(cost, value)`` pairs (costs >= 0, finite values).
        budget: the largest allowed total cost.

    Returns:
        One option index per group, or None when even the cheapest option of every group
        together exceeds ``budget``.

    Raises:
        TensorcutError: an empty group, a negative or non-finite cost, a non-finite value.

    Example:
        >>> solve_mckp([[(10, 0.0), (4, 0.3)], [(10, 0.0), (5, 0.1)]], budget=15)
        [0, 1]
    """
    costs: list[np.ndarray] = []
    values: list[np.ndarray] = []
    for k, g in enumerate(groups):
        if not g:
            raise TensorcutError(f"group {k} has no option; give each group at least one")
        c = np.array([float(o[0]) for o in g])
        v = np.array([float(o[1]) for o in g])
        if not (np.isfinite(c).all() and (c >= 0).all() and np.isfinite(v).all()):
            raise TensorcutError(
                f"group {k}: costs must be finite and >= 0 and values finite, got {list(g)}"
            )
        costs.append(c)
        values.append(v)
    if not groups:
        return []
    # the cheapest completion of groups k.. (for pruning partial choices that cannot fit)
    rest = np.cumsum([c.min() for c in costs][::-1])[::-1].tolist() + [0.0]
    slack = 1e-9 * max(1.0, abs(float(budget)))  # float sums of integer costs
    if rest[0] > budget + slack:
        return None
    f_cost = np.zeros(1)
    f_val = np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for k, (c, v) in enumerate(zip(costs, values, strict=True)):
        n_f, n_o = len(f_cost), len(c)
        if n_f * n_o > MAX_FRONTIER:
            raise TensorcutError(
                f"the choice frontier grew to {n_f * n_o:,} partial choices at group {k}; "
                "give fewer options per group (a coarser ladder)"
            )
        cc = (f_cost[:, None] + c[None, :]).ravel()
        vv = (f_val[:, None] + v[None, :]).ravel()
        parent = np.repeat(np.arange(n_f), n_o)
        opt = np.tile(np.arange(n_o), n_f)
        ok = cc + rest[k + 1] <= budget + slack
        cc, vv, parent, opt = cc[ok], vv[ok], parent[ok], opt[ok]
        order = np.lexsort((vv, cc))  # by cost, then value
        cc, vv, parent, opt = cc[order], vv[order], parent[order], opt[order]
        best_before = np.concatenate(([math.inf], np.minimum.accumulate(vv)[:-1]))
        keep = vv < best_before  # strictly better than every cheaper-or-equal partial choice
        f_cost, f_val = cc[keep], vv[keep]
        back.append((parent[keep], opt[keep]))
    i = int(np.argmin(f_val))  # the frontier's values fall as cost grows: the last point
    choice = [0] * len(groups)
    for k in range(len(groups) - 1, -1, -1):
        parent, opt = back[k]
        choice[k] = int(opt[i])
        i = int(parent[i])
    return choice
