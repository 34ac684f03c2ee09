"""Rank rules: one grammar for every method, and a model-wide budget allocator.

The grammar (DESIGN.md): ``rank=int | tuple`` explicit; ``ratio=float`` fraction of the
layer's parameters to keep; ``eps=float`` bound on the relative Frobenius error;
``energy=float`` fraction of squared norm kept; ``rank="vbmf"`` (Tucker-2 only); and a
model-wide ``budget`` split across layers by :func:`allocate_budget`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tensorcut.decompose.svd import RankClampWarning, clamp_rank
from tensorcut.errors import TensorcutError

__all__ = [
    "RankRule",
    "clamp_ranks",
    "ranks_for_ratio",
    "scaled_ranks",
    "evbmf_rank",
    "vbmf_tucker2_ranks",
    "Candidate",
    "allocate_budget",
]


@dataclass(frozen=True)
class RankRule:
    """Exactly one way to choose ranks. Validated on construction."""

    rank: int | tuple[int, ...] | str | None = None
    ratio: float | None = None
    eps: float | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("rank", "ratio", "eps", "energy") if getattr(self, k) is not None]
        if len(given) > 1:
            raise TensorcutError(
                f"contradictory rank options: {', '.join(given)}; give exactly one of rank, "
                "ratio, eps, energy (or a budget)"
            )
        r = self.rank
        if isinstance(r, str) and r not in ("vbmf", "full"):
            raise TensorcutError(
                f"unknown rank rule {r!r}; use an int, a tuple of ints, 'full' or 'vbmf'"
            )
        if isinstance(r, bool):
            raise TensorcutError("rank must be an int, a tuple of ints, or 'vbmf'")
        if isinstance(r, int) and r < 1:
            raise TensorcutError(f"rank must be >= 1, got {r}")
        if isinstance(r, tuple) and (not r or any((not isinstance(v, int)) or v < 1 for v in r)):
            raise TensorcutError(f"ranks must be positive ints, got {r}")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise TensorcutError(
                "ratio is the fraction of parameters to keep and must be in (0, 1), got "
                f"{self.ratio}"
            )
        if self.eps is not None and not 0 < self.eps < 1:
            raise TensorcutError(
                f"eps is a relative error bound and must be in (0, 1), got {self.eps}"
            )
        if self.energy is not None and not 0 < self.energy <= 1:
            raise TensorcutError(
                "energy is the fraction of squared norm kept and must be in (0, 1], got "
                f"{self.energy}"
            )

    @property
    def kind(self) -> str:
        """'rank', 'full', 'vbmf', 'ratio', 'eps', 'energy' or 'none'."""
        if self.rank in ("vbmf", "full"):
            return str(self.rank)
        for k in ("rank", "ratio", "eps", "energy"):
            if getattr(self, k) is not None:
                return k
        return "none"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "kind": self.kind,
            "rank": list(self.rank) if isinstance(self.rank, tuple) else self.rank,
            "ratio": self.ratio,
            "eps": self.eps,
            "energy": self.energy,
        }


def clamp_ranks(requested: Sequence[int], maximum: Sequence[int]) -> tuple[tuple[int, ...], str]:
    """Each rank through the one clamp rule (:func:`tensorcut.decompose.svd.clamp_rank`:
    an integer >= 1, lowered to what the kernel admits), quietly: the plan records the
    note instead of a warning. Returns the ranks and the note ('' when nothing changed)."""
    if len(requested) != len(maximum):
        raise TensorcutError(
            f"expected {len(maximum)} ranks, got {len(requested)} ({tuple(requested)})"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankClampWarning)
        out = tuple(
            clamp_rank(r, int(m), name=f"rank {k}")
            for k, (r, m) in enumerate(zip(requested, maximum, strict=True))
        )
    note = (
        ""
        if out == tuple(int(r) for r in requested)
        else f"ranks {tuple(requested)} clamped to {out} (kernel admits at most {tuple(maximum)})"
    )
    return out, note


def scaled_ranks(maximum: Sequence[int], s: float) -> tuple[int, ...]:
    """Ranks at fraction ``s`` of each mode's maximum (at least 1)."""
    return tuple(max(1, min(int(m), int(math.ceil(s * m)))) for m in maximum)


def align_ranks(
    ranks: Sequence[int], maximum: Sequence[int], align: int, *, up: bool = False
) -> tuple[int, ...]:
    """Each rank rounded to a multiple of ``align`` (down by default, ``up`` for error-bound rules),
    at least ``align`` and at most the mode's maximum (which wins when it is below ``align``).

    CPU and GPU kernels run convolutions over channel counts that are multiples of the SIMD
    width (8 or 16 floats) markedly faster: on a 2-core AVX-512 Xeon a 3x3 conv over 25 channels
    took as long as one over 32 (benchmarks/results/layer_latency.md).
    """
    if align < 1:
        raise TensorcutError(f"align must be a positive integer, got {align}")
    out = []
    for r, m in zip(ranks, maximum, strict=False):
        a = -(-int(r) // align) * align if up else (int(r) // align) * align
        out.append(min(int(m), max(a, align)))
    return tuple(out)


def ranks_for_ratio(
    maximum: Sequence[int],
    params_of: Callable[[tuple[int, ...]], int],
    target: float,
    align: int = 1,
) -> tuple[int, ...]:
    """Largest uniformly scaled ranks whose parameter count is at most ``target``.

    Works for any method given its closed-form parameter count: bisection on the scale.
    Returns all-ones ranks when even those exceed the target (the planner then reports it).
    With ``align`` > 1 the ranks are rounded down to multiples of ``align`` and then grown
    greedily, one mode by ``align`` at a time (the step that adds the most count first), while
    the count stays within ``target``: uniform scaling then rounding alone would waste most of
    the budget, e.g. (25, 25) -> (16, 16) instead of (32, 16).
    """
    if align > 1:
        r = align_ranks(ranks_for_ratio(maximum, params_of, target), maximum, align)
        while True:
            steps = []
            for k, m in enumerate(maximum):
                if r[k] < m:
                    cand = r[:k] + (min(int(m), r[k] + align),) + r[k + 1 :]
                    c = params_of(cand)
                    if c <= target:
                        steps.append((c, -k, cand))
            if not steps:
                return r
            r = max(steps)[2]
    lo, hi = 0.0, 1.0
    best = scaled_ranks(maximum, 0.0)
    if params_of(scaled_ranks(maximum, 1.0)) <= target:
        return scaled_ranks(maximum, 1.0)
    for _ in range(40):
        mid = (lo + hi) / 2
        r = scaled_ranks(maximum, mid)
        if params_of(r) <= target:
            best, lo = r, mid
        else:
            hi = mid
    return best


# ----------------------------------------------------------------------------- VBMF


def _golden_min(f: Callable[[float], float], a: float, b: float, iters: int = 80) -> float:
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def evbmf_rank(Y: torch.Tensor) -> int:
    """Rank chosen by empirical variational Bayesian matrix factorisation (Nakajima et al., 2013).

    Global analytic solution with the noise variance estimated by minimising the free
    energy; as used by Kim et al. (2016) to pick Tucker-2 ranks. Never returns 0.
    """
    Y = Y.detach().double().cpu()
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    s = torch.linalg.svdvals(Y)
    H = L
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    total = float((Y**2).sum())
    residual = max(total - float((s**2).sum()), 0.0)
    s2 = (s**2).numpy()
    if total == 0:
        return 1
    eh_ub = int(min(math.ceil(L / (1 + alpha)), H)) - 1
    upper = (s2.sum() + residual) / (L * M)
    tail = s2[eh_ub + 1 :] if eh_ub + 1 < H else s2[-1:]
    lower = max(s2[min(eh_ub + 1, H - 1)] / (M * x_bar), float(tail.mean()) / M, 1e-300)

    def tau(x: Any) -> Any:
        return 0.5 * (x - (1 + alpha) + ((x - (1 + alpha)) ** 2 - 4 * alpha) ** 0.5)

    def free_energy(log_sigma2: float) -> float:
        sigma2 = math.exp(log_sigma2)
        x = s2 / (M * sigma2)
        big, small = x[x > x_bar], x[x <= x_bar]
        import numpy as np

        t = tau(big)
        val = float(np.sum(small - np.log(np.maximum(small, 1e-300))))
        val += (
            float(np.sum(big - t))
            + float(np.sum(np.log((t + 1) / big)))
            + alpha * float(np.sum(np.log(t / alpha + 1)))
        )
        return val + residual / (M * sigma2) + (L - H) * log_sigma2

    if upper <= lower:
        sigma2 = upper
    else:
        sigma2 = math.exp(_golden_min(free_energy, math.log(lower), math.log(upper)))
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return max(1, int((s > threshold).sum()))


def vbmf_tucker2_ranks(weight: torch.Tensor) -> tuple[int, int]:
    """(r_out, r_in) for Tucker-2 by EVBMF on the OUT and IN unfoldings of a (OUT, IN, KH, KW)
    kernel.
    """
    o, i = weight.shape[:2]
    r_out = evbmf_rank(weight.reshape(o, -1))
    r_in = evbmf_rank(weight.transpose(0, 1).reshape(i, -1))
    return r_out, r_in


# ----------------------------------------------------------------------------- budget


@dataclass
class Candidate:
    """One way to factorize one layer: ranks, cost, and the error it introduces."""

    ranks: tuple[int, ...]
    params: int
    macs: int
    error: float | None = None  # None: computed on demand by the ladder's ``evaluate``


@dataclass
class LayerLadder:
    """Candidates of one layer ordered from largest (least compressed) to smallest."""

    name: str
    dense_params: int
    dense_macs: int
    candidates: list[Candidate]
    weight: float = 1.0
    choice: int = -1  # -1 = dense
    evaluate: Callable[[int], float] | None = None

    def error_at(self, i: int) -> float:
        """Error of candidate ``i``, computed once on demand (decompositions are costly)."""
        c = self.candidates[i]
        if c.error is None:
            if self.evaluate is None:
                raise TensorcutError(
                    f"candidate {c.ranks} of {self.name} has no error and no way to compute it"
                )
            c.error = float(self.evaluate(i))
        return c.error

    def dense_cost(self, kind: str) -> int:
        """The dense layer's parameters or MACs."""
        return self.dense_params if kind == "params" else self.dense_macs

    def cost_at(self, i: int, kind: str) -> int:
        """Cost of candidate ``i`` (-1: the dense layer)."""
        if i < 0:
            return self.dense_cost(kind)
        c = self.candidates[i]
        return c.params if kind == "params" else c.macs

    def cost(self, kind: str) -> int:
        """Cost of the current choice."""
        return self.cost_at(self.choice, kind)

    def error(self) -> float:
        """Relative error of the current choice (0 when dense)."""
        return 0.0 if self.choice < 0 else self.error_at(self.choice)


def allocate_budget(
    ladders: list[LayerLadder],
    budget: float,
    kind: str = "params",
    fixed_cost: int = 0,
    *,
    rule: str = "minmax",
) -> bool:
    """Split ``budget`` over the ladders: set each ladder's ``choice``; return whether it was met.

    ``budget`` is the total allowed cost (parameters or MACs) of the listed layers plus
    ``fixed_cost`` (everything not listed). A layer's weighted loss is ``weight * error**2``
    (``error``: the candidate's relative kernel error, scale-free), so a sensitive layer (large
    weight) is compressed more mildly. When the budget cannot be met every ladder holds its
    smallest candidate reached.

    ``rule="minmax"`` (default): the smallest level ``t`` such that giving every layer its
    cheapest candidate with ``sqrt(weight) * error <= t`` meets the budget (bisection over the
    levels the ladders offer), then the slack the discrete ladders leave is spent where it
    removes the most weighted loss per unit of cost. Why: no layer is driven far below the others
    just because squeezing it is cheap — under a MAC budget the greedy rule crushed a resnet20's
    16-channel convs to rank 1 (benchmarks/results/pruning_frontier.md).

    ``rule="fraction"``: the same min-max search over the fraction of the layer's parameters a
    candidate removes, ``sqrt(weight) * (1 - params / dense_params)``, errors unused: without
    weights every layer keeps about the same fraction (uniform ranks at the budget), a weight
    ``w`` divides the layer's removed fraction by ``sqrt(w)``.

    ``rule="greedy"``: from the current choices, repeatedly step down the layer with the least
    weighted loss added per unit of cost saved.
    """
    if kind not in ("params", "macs"):
        raise TensorcutError(f"budget kind must be 'params' or 'macs', got {kind!r}")
    if rule == "greedy":
        return _allocate_greedy(ladders, budget, kind, fixed_cost)
    if rule in ("minmax", "fraction"):
        return _allocate_minmax(ladders, budget, kind, fixed_cost, by_fraction=rule == "fraction")
    raise TensorcutError(f"allocation rule must be 'minmax', 'fraction' or 'greedy', got {rule!r}")


def _allocate_greedy(ladders: list[LayerLadder], budget: float, kind: str, fixed_cost: int) -> bool:
    """Greedy descent: least weighted loss added per unit of cost saved first."""

    def total() -> int:
        return fixed_cost + sum(lad.cost(kind) for lad in ladders)

    while total() > budget:
        best, best_score = None, math.inf
        for lad in ladders:
            nxt = lad.choice + 1
            while nxt < len(lad.candidates) and lad.cost_at(nxt, kind) >= lad.cost(kind):
                nxt += 1
            if nxt >= len(lad.candidates):
                continue
            saved = lad.cost(kind) - lad.cost_at(nxt, kind)
            added = lad.weight * (lad.error_at(nxt) ** 2 - lad.error() ** 2)
            score = max(added, 0.0) / saved
            if score < best_score:
                best, best_score = (lad, nxt), score
        if best is None:
            return False
        best[0].choice = best[1]
    return True


def _allocate_minmax(
    ladders: list[LayerLadder], budget: float, kind: str, fixed_cost: int, by_fraction: bool
) -> bool:
    """Min-max weighted level, then the slack spent greedily (see :func:`allocate_budget`)."""
    # per ladder: (candidate index, weighted level) of each candidate cheaper than dense; by error,
    # every candidate is evaluated (the level search needs them all) and failed ones are dropped
    rows: list[list[tuple[int, float]]] = []
    for lad in ladders:
        scale = math.sqrt(max(float(lad.weight), 0.0))
        row = []
        for i, c in enumerate(lad.candidates):
            if lad.cost_at(i, kind) < lad.dense_cost(kind):
                if by_fraction:
                    row.append((i, scale * (1.0 - c.params / lad.dense_params)))
                    continue
                e = lad.error_at(i)
                if math.isfinite(e):
                    row.append((i, scale * e))
        rows.append(row)

    def pick(t: float) -> list[int]:
        """By error: each ladder's cheapest candidate with weighted error <= ``t`` (-1: dense).
        By fraction: its largest candidate (or dense) that removes a weighted fraction >= ``t``
        (rounding down as the ratio rule does), else its smallest."""
        out = []
        for lad, row in zip(ladders, rows, strict=True):
            if by_fraction:
                ok = [(lad.cost_at(i, kind), i) for i, v in [*row, (-1, 0.0)] if v >= t]
                low = min(((lad.cost_at(i, kind), i) for i, _ in row), default=(0, -1))
                out.append(max(ok)[1] if ok else low[1])
                continue
            ok = [(lad.cost_at(i, kind), i) for i, v in row if v <= t]
            out.append(min(ok)[1] if ok else -1)
        return out

    def total(choice: list[int]) -> int:
        return fixed_cost + sum(
            lad.cost_at(i, kind) for lad, i in zip(ladders, choice, strict=True)
        )

    levels = sorted({0.0} | {v for row in rows for _, v in row})
    if total(pick(levels[-1])) > budget:
        for lad, i in zip(ladders, pick(math.inf), strict=True):
            lad.choice = i if i >= 0 else lad.choice
        return False
    lo, hi = 0, len(levels) - 1  # invariant: levels[hi] meets the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if total(pick(levels[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    choice = pick(levels[hi])
    level = [{**dict(row), -1: 0.0} for row in rows]
    while by_fraction:  # spend the slack: the layer that removes most steps up one candidate
        spare = budget - total(choice)
        steps = []
        for k, lad in enumerate(ladders):
            have = lad.cost_at(choice[k], kind)
            up = [(lad.cost_at(i, kind), i) for i in level[k] if lad.cost_at(i, kind) > have]
            if up and min(up)[0] - have <= spare:
                steps.append((-level[k][choice[k]], k, min(up)[1]))
        if not steps:
            break
        _, k, i = min(steps)
        choice[k] = i
    if by_fraction:
        for lad, i in zip(ladders, choice, strict=True):
            lad.choice = i
        return True
    loss = [dict(row) for row in rows]
    while True:  # spend the slack: step up where it removes the most weighted loss per unit cost
        spare = budget - total(choice)
        best, best_rate = None, 0.0
        for k, lad in enumerate(ladders):
            cur = choice[k]
            now = 0.0 if cur < 0 else loss[k][cur] ** 2
            for i, v in [*rows[k], (-1, 0.0)]:
                added = lad.cost_at(i, kind) - lad.cost_at(cur, kind)
                gain = now - v * v
                if 0 < added <= spare and gain > 0 and gain / added > best_rate:
                    best, best_rate = (k, i), gain / added
        if best is None:
            break
        choice[best[0]] = best[1]
    for lad, i in zip(ladders, choice, strict=True):
        lad.choice = i
    return True
