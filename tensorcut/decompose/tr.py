"""Tensor-ring (TR) decomposition of 4-way convolution kernels: TR-SVD and the RSDTR search.

A kernel ``T`` of shape (OUT, IN, KH, KW) is written as a closed ring of four 3-way cores

    T[o, i, h, w] = trace(G_out[:, o, :] @ G_in[:, i, :] @ G_kh[:, h, :] @ G_kw[:, w, :])

with ``G_out`` (a, OUT, b), ``G_in`` (b, IN, c), ``G_kh`` (c, KH, d), ``G_kw`` (d, KW, a), so the
ring ranks are ``(a, b, c, d)`` and the storage is ``a*O*b + b*I*c + c*KH*d + d*KW*a``.

**TR-SVD** (Zhao et al. 2016, as used by RSDTR, Gabor & Zdunek 2024) opens the ring at one mode:
the modes are first rotated circularly by ``shift`` (the ring starts at mode ``shift``), then
three sequential truncated SVDs peel off one core each. The first SVD's rank ``R0`` is split as
``r0 * r1`` by ``divisor = r0``; ``r0`` becomes the rank that closes the ring (``r0 = 1`` is a
plain tensor train). The kernel is never reshaped into more than its four modes.

**Error budget.** Every step's left factor has orthonormal columns, so the squared error of
the whole ring is exactly the sum of the energies discarded by the three SVDs:
``||T - T~||^2 = D1 + D2 + D3``. Any split with ``sum(delta_k^2) <= eps^2 ||T||^2`` therefore
keeps the relative error at most ``eps``. ``split="uniform"`` (default) gives each of the
``d - 1 = 3`` SVDs ``eps^2 ||T||^2 / 3`` (as the RSDTR authors' code and TT-SVD do);
``split="zhao"`` gives the first SVD ``2 eps^2 ||T||^2 / d`` and the other two ``eps^2 ||T||^2 / d``
(Zhao et al.'s TR-SVD, ``d = 4``), which truncates the split first rank harder.

**RSDTR** tries every circular shift and every divisor of that shift's first rank and keeps the
cheapest ring (fewest stored parameters, or fewest MACs of the four-sublayer layer). The search
scores candidates from float64 Gram-matrix eigenvalues (one first-step factorisation per shift,
reused for all divisors), then recomputes the winner with exact SVDs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tensorcut.decompose.svd import small_lapack
from tensorcut.errors import TensorcutError

__all__ = [
    "MODES",
    "SPLITS",
    "TRCandidate",
    "TRResult",
    "tr_svd",
    "rsdtr",
    "tr_to_tensor",
    "tr_params",
    "tr_macs",
    "tr_max_ranks",
    "early_strides",
    "error_budgets",
]

MODES = ("OUT", "IN", "KH", "KW")
SPLITS = ("uniform", "zhao")
OBJECTIVES = ("params", "macs")

# Work on kernels up to _SINGLE_THREAD_KERNEL entries (every conv of a ResNet-18/50, VGG) runs on
# one thread, and so do LAPACK calls on matrices up to the other two limits. A search is many
# small-to-medium GEMMs, eigendecompositions and elementwise ops that gain little from threads,
# while threaded BLAS/OpenMP on a busy machine stalls: measured on a shared 2-core box, RSDTR over
# a ResNet-18 took 26 s on one thread and 220 s on two. The caller's thread count is restored.
_SINGLE_THREAD_KERNEL = 1 << 22
_SINGLE_THREAD_GRAM = 512 * 512
_SINGLE_THREAD_SVD = 1 << 16

Ranks = tuple[int, int, int, int]
IntPair = tuple[int, int]


@dataclass(frozen=True)
class TRCandidate:
    """One (shift, divisor) option scored by the RSDTR search.

    ``ranks`` are in the fixed (a, b, c, d) convention; ``macs`` is ``None`` when no input size
    was given; ``rel_error`` is the predicted relative Frobenius error.
    """

    shift: int
    divisor: int
    ranks: Ranks
    params: int
    macs: int | None
    rel_error: float

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return {
            "shift": self.shift,
            "divisor": self.divisor,
            "ranks": list(self.ranks),
            "params": self.params,
            "macs": self.macs,
            "rel_error": self.rel_error,
        }


@dataclass
class TRResult:
    """A tensor ring of a 4-way kernel.

    ``cores`` are always in mode order OUT, IN, KH, KW whatever shift produced them; core ``k``
    has shape ``(ranks[k], n_k, ranks[(k + 1) % 4])``. ``step_errors`` are the relative norms
    ``sqrt(D_k) / ||T||`` discarded by the three SVDs, ``step_budgets`` their allowed maxima
    (``None`` for explicit ranks). ``search`` lists every candidate RSDTR scored (empty for a
    plain :func:`tr_svd`); ``notes`` reports any clamp or adjustment of requested ranks.
    """

    cores: list[Tensor]
    ranks: Ranks
    rel_error: float
    shift: int
    divisor: int
    step_errors: tuple[float, float, float]
    step_budgets: tuple[float, float, float] | None = None
    search: list[TRCandidate] = field(default_factory=list)
    notes: tuple[str, ...] = ()

    @property
    def params(self) -> int:
        """Stored entries of the four cores."""
        return sum(int(c.numel()) for c in self.cores)

    def to_tensor(self) -> Tensor:
        """The dense kernel this ring represents."""
        return tr_to_tensor(self.cores)


# ----------------------------------------------------------------------------- validation


def _check_kernel(kernel: object) -> Tensor:
    if not isinstance(kernel, Tensor):
        raise TensorcutError(
            f"kernel must be a torch.Tensor, got {type(kernel).__name__}; pass conv.weight"
        )
    if kernel.dim() != 4:
        raise TensorcutError(
            "TR needs a 4-way (OUT, IN, KH, KW) kernel, "
            f"got shape {tuple(kernel.shape)}; pass a Conv2d weight"
        )
    if not kernel.is_floating_point():
        raise TensorcutError(
            f"kernel must be floating point, got {kernel.dtype}; convert it with .float()"
        )
    if min(kernel.shape) < 1:
        raise TensorcutError(
            f"kernel has an empty mode, shape {tuple(kernel.shape)}; nothing to decompose"
        )
    if not bool(torch.isfinite(kernel).all()):
        raise TensorcutError("kernel contains NaN or Inf; fix the weights before decomposing")
    return kernel


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TensorcutError(f"eps must be a number in (0, 1), got {eps!r}")
    e = float(eps)
    if not (0.0 < e < 1.0) or math.isnan(e):
        raise TensorcutError(
            f"eps={eps!r} is outside (0, 1); it bounds the relative Frobenius error, e.g. eps=0.3"
        )
    return e


def _check_shift(shift: object) -> int:
    if isinstance(shift, str) and shift.upper() in MODES:
        return MODES.index(shift.upper())
    if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < 4:
        raise TensorcutError(f"shift must be 0..3 or one of {MODES}, got {shift!r}")
    return int(shift)


def _check_split(split: object) -> str:
    if split not in SPLITS:
        raise TensorcutError(f"split must be one of {SPLITS}, got {split!r}")
    return str(split)


def _as_pair(v: int | Sequence[int], name: str) -> IntPair:
    if isinstance(v, bool):
        raise TensorcutError(f"{name} must be an int or a pair, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise TensorcutError(f"{name} must be an int or a pair, got {v!r}")
    return (t[0], t[1])


def _as_pad4(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) from an int, a (ph, pw) pair or an explicit 4-tuple."""
    if isinstance(padding, bool):
        raise TensorcutError(
            f"padding must be an int, (ph, pw) or (left, right, top, bottom), got {padding!r}"
        )
    if isinstance(padding, int):
        return (padding, padding, padding, padding)
    t = tuple(int(x) for x in padding)
    if len(t) == 2:
        return (t[1], t[1], t[0], t[0])
    if len(t) == 4:
        return (t[0], t[1], t[2], t[3])
    raise TensorcutError(
        f"padding must be an int, (ph, pw) or (left, right, top, bottom), got {padding!r}"
    )


# ----------------------------------------------------------------------------- counting


def tr_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Stored entries of a ring with ``ranks`` (a, b, c, d) over a kernel of ``shape``."""
    n = [int(x) for x in shape]
    r = [int(x) for x in ranks]
    return sum(r[k] * n[k] * r[(k + 1) % 4] for k in range(4))


def early_strides(kernel_size: IntPair, stride: IntPair, pad: tuple[int, int, int, int]) -> IntPair:
    """Strides the TR layer applies already in its first 1x1 contraction.

    Along an axis whose kernel extent is 1 and which has no padding, striding commutes with the
    1x1 channel contraction, so it is applied there (the input is subsampled before any work).
    Returns (vertical, horizontal); 1 means "stride later, in the 1-D convolution".
    """
    left, right, top, bottom = pad
    sh = stride[0] if kernel_size[0] == 1 and top == 0 and bottom == 0 else 1
    sw = stride[1] if kernel_size[1] == 1 and left == 0 and right == 0 else 1
    return (sh, sw)


def tr_macs(
    shape: Sequence[int],
    ranks: Sequence[int],
    input_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> int:
    """Multiply-accumulates per image of the four-sublayer TR convolution.

    Schedule (see ``tensorcut.layers.tr.TRConv2d``), with ranks (a, b, c, d):
    1x1 IN -> b*c at H1 x W1; pad; KH x 1 conv c -> d, batched over b, at H' x Wp;
    1 x KW conv d -> a, batched over b, at H' x W'; 1x1 b*a -> OUT at H' x W'.
    ``padding`` is an int, (ph, pw) or explicit (left, right, top, bottom).
    """
    o, i, kh, kw = (int(x) for x in shape)
    a, b, c, d = (int(x) for x in ranks)
    h, w = _as_pair(input_size, "input_size")
    sh, sw = _as_pair(stride, "stride")
    dh, dw = _as_pair(dilation, "dilation")
    pad = _as_pad4(padding)
    eh, ew = early_strides((kh, kw), (sh, sw), pad)
    h1 = (h - 1) // eh + 1
    w1 = (w - 1) // ew + 1
    hp = h1 + pad[2] + pad[3]
    wp = w1 + pad[0] + pad[1]
    ho = (hp - dh * (kh - 1) - 1) // (sh // eh) + 1
    wo = (wp - dw * (kw - 1) - 1) // (sw // ew) + 1
    if ho < 1 or wo < 1:
        raise TensorcutError(
            f"input {h}x{w} is too small for kernel {kh}x{kw} with this padding/dilation"
        )
    return (
        i * b * c * h1 * w1
        + b * c * d * kh * ho * wp
        + b * d * a * kw * ho * wo
        + b * a * o * ho * wo
    )


def tr_max_ranks(shape: Sequence[int]) -> Ranks:
    """Ranks (a, b, c, d) at which shift-0 TR-SVD with divisor 1 is exact (a tensor train)."""
    o, i, kh, kw = (int(x) for x in shape)
    return (1, min(o, i * kh * kw), min(o * i, kh * kw), min(o * i * kh, kw))


def error_budgets(eps: float, split: str = "uniform") -> tuple[float, float, float]:
    """Relative error allowed to each of the three SVDs; their squares sum to ``eps**2``."""
    e = _check_eps(eps)
    if _check_split(split) == "zhao":
        d = 4
        return (e * math.sqrt(2.0 / d), e / math.sqrt(d), e / math.sqrt(d))
    return (e / math.sqrt(3.0),) * 3


# ----------------------------------------------------------------------------- ring algebra


def tr_to_tensor(cores: Sequence[Tensor]) -> Tensor:
    """Contract a closed ring of 3-way cores ``(r_k, n_k, r_{k+1})`` into the full tensor."""
    if len(cores) < 1:
        raise TensorcutError("tr_to_tensor needs at least one core")
    for k, g in enumerate(cores):
        if g.dim() != 3:
            raise TensorcutError(
                f"core {k} must be 3-way (r_k, n_k, r_k+1), got shape {tuple(g.shape)}"
            )
        nxt = cores[(k + 1) % len(cores)]
        if g.shape[2] != nxt.shape[0]:
            raise TensorcutError(
                f"ring rank mismatch between core {k} {tuple(g.shape)} "
                f"and core {(k + 1) % len(cores)} "
                f"{tuple(nxt.shape)}; the last rank of each core must equal the first of the next"
            )
    ns = [int(g.shape[1]) for g in cores]
    if len(cores) == 4:
        # Contract two neighbouring pairs, then close both remaining ranks in one GEMM; pair so
        # that the closed ranks' product is smallest (memory and work scale with it).
        r = [int(g.shape[0]) for g in cores]
        k = 0 if r[0] * r[2] <= r[1] * r[3] else 1
        g0, g1, g2, g3 = (cores[(k + j) % 4] for j in range(4))
        left = torch.einsum("anb,bmc->anmc", g0, g1)  # (ra, n0, n1, rc)
        right = torch.einsum("cpd,dqa->apqc", g2, g3)  # (ra, n2, n3, rc)
        ra, rc = left.shape[0], left.shape[-1]
        full = left.permute(1, 2, 0, 3).reshape(-1, ra * rc) @ right.permute(0, 3, 1, 2).reshape(
            ra * rc, -1
        )
        full = full.reshape(g0.shape[1], g1.shape[1], g2.shape[1], g3.shape[1])
        return full if k == 0 else full.permute(3, 0, 1, 2)
    acc = cores[0]  # (r0, N, r_k)
    for g in cores[1:]:
        r0, n, rk = acc.shape
        acc = (acc.reshape(r0 * n, rk) @ g.reshape(rk, -1)).reshape(r0, n * g.shape[1], g.shape[2])
    full = torch.diagonal(acc, dim1=0, dim2=2).sum(-1)
    return full.reshape(ns)


def _rotation(shift: int) -> list[int]:
    return [(shift + k) % 4 for k in range(4)]


def _unrotate(
    rot_cores: list[Tensor], rot_ranks: Sequence[int], shift: int
) -> tuple[list[Tensor], Ranks]:
    cores: list[Tensor] = [rot_cores[0]] * 4
    ranks = [0, 0, 0, 0]
    for k in range(4):
        cores[(shift + k) % 4] = rot_cores[k]
        ranks[(shift + k) % 4] = int(rot_ranks[k])
    return cores, (ranks[0], ranks[1], ranks[2], ranks[3])


def _keep_for_budget(s2: Tensor, allowed: float) -> int:
    """Smallest rank r >= 1 whose discarded energy ``sum(s2[r:])`` is within ``allowed``."""
    k = int(s2.numel())
    if k <= 1:
        return max(k, 1)
    tails = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])  # tails[r] = sum(s2[r:])
    ok = (tails[1:] <= allowed).nonzero()
    return int(ok[0]) + 1 if ok.numel() else k


class _Factor:
    """Spectrum and leading subspace of one unfolding ``m``, by exact SVD or by a Gram matrix.

    ``solver="gram"`` eigendecomposes the smaller of ``m m^T`` / ``m^T m`` in float64, several
    times faster than an SVD; squaring costs accuracy only for singular values below ~1e-8 of the
    largest, far under any truncation the eps rule makes (``rsdtr`` uses exact SVDs for eps < 1e-6).
    Bases get a canonical sign (largest-magnitude entry of each carry row positive): the first
    step's basis is split into two ring ranks, so without a convention the result would depend on
    the LAPACK sign choice.
    """

    def __init__(self, m: Tensor, solver: str, vectors: bool) -> None:
        self.m = m
        self.kind = "svd" if solver == "svd" else ("rows" if m.shape[0] <= m.shape[1] else "cols")
        self.q: Tensor | None = None
        self.vh: Tensor | None = None
        if self.kind == "svd":
            with small_lapack(m, limit=_SINGLE_THREAD_SVD):
                if vectors:
                    self.q, sv, self.vh = torch.linalg.svd(m, full_matrices=False)
                else:
                    sv = torch.linalg.svdvals(m)
            self.s2 = sv * sv
            return
        g = m @ m.T if self.kind == "rows" else m.T @ m
        with small_lapack(g, limit=_SINGLE_THREAD_GRAM):
            if vectors:
                w, q = torch.linalg.eigh(g)
                self.q = torch.flip(q, [1])
            else:
                w = torch.linalg.eigvalsh(g)
        self.s2 = torch.flip(w, [0]).clamp_min(0.0)

    def keep(self, allowed: float | None, target: int | None = None) -> tuple[int, float]:
        """Rank to keep (by budget, or a target clamped to the spectrum), energy discarded."""
        k = int(self.s2.numel())
        if target is not None:
            r = max(1, min(target, k))
        else:
            assert allowed is not None, "keep() needs an error budget or a target rank"
            r = _keep_for_budget(self.s2, float(allowed))
        return r, float(self.s2[r:].sum())

    def carry(self, r: int, signed: bool = True) -> Tensor:
        """``S_r V_r^T`` (r x cols), with canonical signs unless ``signed=False``."""
        assert self.q is not None
        if self.kind == "svd":
            assert self.vh is not None  # set with q by the SVD
            c = self.s2[:r].sqrt()[:, None] * self.vh[:r]
        elif self.kind == "rows":
            c = self.q[:, :r].T @ self.m
        else:
            c = self.s2[:r].sqrt()[:, None] * self.q[:, :r].T
        return c * _signs(c)[:, None] if signed else c

    def split(self, r: int) -> tuple[Tensor, Tensor]:
        """(Q, Q^T m): an orthonormal basis of the leading r-dim column space and the carry."""
        assert self.q is not None
        if self.kind == "svd":
            assert self.vh is not None  # set with q by the SVD
            q, c = self.q[:, :r], self.s2[:r].sqrt()[:, None] * self.vh[:r]
        else:
            q = self.q[:, :r] if self.kind == "rows" else torch.linalg.qr(self.m @ self.q[:, :r])[0]
            c = q.T @ self.m
        sg = _signs(c)
        return q * sg[None, :], c * sg[:, None]


def _signs(c: Tensor) -> Tensor:
    """+-1 per row of ``c`` making each row's largest-magnitude entry positive."""
    idx = c.abs().argmax(dim=1, keepdim=True)
    sg = torch.sign(torch.gather(c, 1, idx).squeeze(1))
    return torch.where(sg == 0, torch.ones_like(sg), sg)


def _regroup(carry: Tensor, r0: int, r1: int, rest: Sequence[int]) -> Tensor:
    """(r0*r1, rest...) with row index l*r1 + j  ->  (r1, rest..., r0).

    Moves the split rank to the end.
    """
    t = carry.reshape(r0, r1, *rest)
    return t.permute(1, *range(2, 2 + len(rest)), 0)


def _solver(solver: str, eps: float | None) -> str:
    if solver not in ("svd", "gram", "auto"):
        raise TensorcutError(f"solver must be 'svd', 'gram' or 'auto', got {solver!r}")
    if solver == "auto":
        return "gram" if eps is not None and eps >= 1e-6 else "svd"
    return solver


# ----------------------------------------------------------------------------- TR-SVD


def tr_svd(
    kernel: Tensor,
    eps: float | None = None,
    *,
    ranks: Sequence[int] | None = None,
    shift: int | str = 0,
    divisor: int | None = None,
    split: str = "uniform",
    solver: str = "svd",
) -> TRResult:
    """TR-SVD of a (OUT, IN, KH, KW) kernel with modes rotated by ``shift``.

    Give either ``eps`` (relative Frobenius error bound, split across the three SVDs by
    ``split``) with an optional ``divisor`` of the first rank (default 1: a tensor train), or
    explicit ``ranks=(a, b, c, d)`` (the divisor is then the ring-closing rank ``ranks[shift]``).
    Requested ranks beyond what the kernel admits are clamped (the closing rank ``ranks[shift]``
    first, then each later rank to its unfolding's size) and the clamp is listed in ``notes``;
    an eps-chosen first rank not divisible by ``divisor`` is raised to the next multiple
    (still within the bound) and noted. ``solver`` is ``"svd"`` (exact, default), ``"gram"``
    (Gram eigendecompositions, faster) or ``"auto"``. Computation is in float64; cores come back
    in the kernel's dtype, in mode order OUT, IN, KH, KW. ``rel_error`` is
    ``sqrt(D1 + D2 + D3) / ||T||``, which equals the reconstruction error because every step's
    basis is orthonormal.
    """
    with (
        small_lapack(kernel, limit=_SINGLE_THREAD_KERNEL)
        if isinstance(kernel, Tensor)
        else nullcontext()
    ):
        return _tr_svd(
            kernel, eps, ranks=ranks, shift=shift, divisor=divisor, split=split, solver=solver
        )


def _tr_svd(
    kernel: Tensor,
    eps: float | None,
    *,
    ranks: Sequence[int] | None,
    shift: int | str,
    divisor: int | None,
    split: str,
    solver: str,
) -> TRResult:
    kernel = _check_kernel(kernel)
    s = _check_shift(shift)
    if (eps is None) == (ranks is None):
        raise TensorcutError(
            "tr_svd needs exactly one of eps=... (error bound) or ranks=(a, b, c, d)"
        )
    budgets = error_budgets(eps, split) if eps is not None else None
    how = _solver(solver, eps if eps is not None else 1.0)
    if divisor is not None and (
        isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1
    ):
        raise TensorcutError(f"divisor must be a positive int, got {divisor!r}")

    t = kernel.detach().to(torch.float64)
    norm2 = float((t * t).sum())
    rt = t.permute(_rotation(s)).contiguous()
    n = [int(x) for x in rt.shape]
    allowed = [(b * b) * norm2 for b in budgets] if budgets is not None else [None, None, None]
    notes: list[str] = []
    target: list[int | None] = [None, None, None, None]
    if ranks is not None:
        rq = [int(x) for x in ranks]
        if len(rq) != 4 or min(rq) < 1:
            raise TensorcutError(f"ranks must be four positive ints (a, b, c, d), got {ranks!r}")
        if divisor is not None and divisor != rq[s]:
            raise TensorcutError(
                f"divisor={divisor} conflicts with ranks: "
                f"with explicit ranks the divisor is ranks[shift]={rq[s]}"
            )
        target = [rq[(s + k) % 4] for k in range(4)]  # rotated (r0, r1, r2, r3)

    # step 1: n0 x (n1 n2 n3); keep R0 = r0 * r1, split by the divisor r0
    f1 = _Factor(rt.reshape(n[0], -1), how, vectors=True)
    max0 = int(f1.s2.numel())
    if ranks is not None:
        t0, t1 = target[0], target[1]
        assert t0 is not None and t1 is not None  # explicit ranks fill every target
        r0, r1 = int(t0), int(t1)
        if r0 * r1 > max0:
            # the ring-closing rank gives way first (towards a tensor train), so a request
            # above max_ranks in every position comes back as exactly max_ranks
            nr1 = min(r1, max0)
            nr0 = max(1, max0 // nr1)
            notes.append(
                f"first rank {r0}*{r1} exceeds {max0} (mode {MODES[s]}); clamped to {nr0}*{nr1}"
            )
            r0, r1 = nr0, nr1
        big_r, d1 = f1.keep(None, r0 * r1)
    else:
        r0 = divisor or 1
        big_r, d1 = f1.keep(allowed[0])
        if big_r % r0:
            raised = -(-big_r // r0) * r0
            if raised > max0:
                raise TensorcutError(
                    f"divisor {r0} does not divide the first rank {big_r} "
                    f"and no multiple fits in {max0}; "
                    f"use a divisor of {big_r} or let rsdtr choose"
                )
            notes.append(
                f"first rank raised from {big_r} to {raised} to be divisible by divisor {r0}"
            )
            big_r, d1 = f1.keep(None, raised)
        r1 = big_r // r0
    u1, c1 = f1.split(big_r)
    g0 = u1.reshape(n[0], r0, r1).permute(1, 0, 2)

    # step 2: (r1 n1) x (n2 n3 r0); step 3: (r2 n2) x (n3 r0); the remainder is the last core
    f2 = _Factor(_regroup(c1, r0, r1, n[1:]).reshape(r1 * n[1], -1), how, vectors=True)
    r2, d2 = f2.keep(allowed[1], target[2])
    u2, c2 = f2.split(r2)
    f3 = _Factor(c2.reshape(r2 * n[2], n[3] * r0), how, vectors=True)
    r3, d3 = f3.keep(allowed[2], target[3])
    u3, c3 = f3.split(r3)
    rot = [g0, u2.reshape(r1, n[1], r2), u3.reshape(r2, n[2], r3), c3.reshape(r3, n[3], r0)]

    cores64, fixed = _unrotate(rot, (r0, r1, r2, r3), s)
    if ranks is not None and tuple(fixed) != tuple(int(x) for x in ranks):
        notes.append(
            f"requested ranks {tuple(int(x) for x in ranks)} became {fixed} "
            "(what the kernel admits)"
        )
    err = math.sqrt(max(d1 + d2 + d3, 0.0) / norm2) if norm2 > 0 else 0.0
    steps = tuple(math.sqrt(max(x, 0.0) / norm2) if norm2 > 0 else 0.0 for x in (d1, d2, d3))
    return TRResult(
        cores=[g.to(kernel.dtype).contiguous() for g in cores64],
        ranks=fixed,
        rel_error=err,
        shift=s,
        divisor=r0,
        step_errors=(steps[0], steps[1], steps[2]),
        step_budgets=budgets,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------- RSDTR search


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, int(math.isqrt(n)) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def rsdtr(
    kernel: Tensor,
    eps: float,
    *,
    objective: str | Callable[[Ranks], int] = "params",
    input_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    split: str = "uniform",
    shifts: Sequence[int] | None = None,
    solver: str = "auto",
) -> TRResult:
    """Reduced-storage direct TR: the cheapest TR-SVD over all circular shifts x divisors.

    For each shift the first unfolding is factorised once; every divisor ``r0`` of its rank
    ``R0`` (``r0 = 1``, a tensor train, included) is then scored by the two remaining
    factorisations. ``objective`` is ``"params"`` (stored core entries), ``"macs"``
    (multiply-accumulates of the four-sublayer layer at ``input_size`` with the given stride /
    padding / dilation), or a callable ``ranks -> cost``. Ties are broken deterministically by,
    in order: fewer MACs (params objective, when an input size is known) or fewer parameters
    (other objectives), smaller relative error (rounded to 1e-9), smaller shift, smaller divisor.
    ``solver="auto"`` scores with Gram eigendecompositions (exact SVDs for eps < 1e-6). The
    winner is rebuilt by :func:`tr_svd` with the same solver; ``search`` holds every candidate.
    """
    with (
        small_lapack(kernel, limit=_SINGLE_THREAD_KERNEL)
        if isinstance(kernel, Tensor)
        else nullcontext()
    ):
        return _rsdtr(
            kernel,
            eps,
            objective=objective,
            input_size=input_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            split=split,
            shifts=shifts,
            solver=solver,
        )


def _rsdtr(
    kernel: Tensor,
    eps: float,
    *,
    objective: str | Callable[[Ranks], int],
    input_size: int | Sequence[int] | None,
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    split: str,
    shifts: Sequence[int] | None,
    solver: str,
) -> TRResult:
    kernel = _check_kernel(kernel)
    e = _check_eps(eps)
    budgets = error_budgets(e, split)
    how = _solver(solver, e)
    if not callable(objective) and objective not in OBJECTIVES:
        raise TensorcutError(
            f"objective must be one of {OBJECTIVES} or a callable ranks -> cost, got {objective!r}"
        )
    if objective == "macs" and input_size is None:
        raise TensorcutError(
            "objective='macs' needs input_size=(H, W), the layer's input resolution"
        )
    shape = tuple(int(x) for x in kernel.shape)
    shift_list = [_check_shift(x) for x in shifts] if shifts is not None else [0, 1, 2, 3]
    if not shift_list:
        raise TensorcutError("shifts must name at least one shift in 0..3")

    def macs_of(r: Ranks) -> int | None:
        if input_size is None:
            return None
        return tr_macs(shape, r, input_size, stride=stride, padding=padding, dilation=dilation)

    def key(cd: TRCandidate) -> tuple[float, float, float, int, int]:
        if callable(objective):
            primary, secondary = float(objective(cd.ranks)), float(cd.params)
        elif objective == "macs":
            assert cd.macs is not None  # input_size is required for this objective (above)
            primary, secondary = float(cd.macs), float(cd.params)
        else:
            primary, secondary = float(cd.params), float(cd.macs) if cd.macs is not None else 0.0
        return (primary, secondary, round(cd.rel_error, 9), cd.shift, cd.divisor)

    cands = _score(kernel, shape, budgets, shift_list, macs_of, how)
    best = min(cands, key=key)
    res = tr_svd(kernel, e, shift=best.shift, divisor=best.divisor, split=split, solver=how)
    if res.ranks != best.ranks:
        res.notes = res.notes + (
            f"rebuilding gave ranks {res.ranks}, the search scored {best.ranks}",
        )
    res.search = cands
    return res


def _score(
    kernel: Tensor,
    shape: tuple[int, ...],
    budgets: tuple[float, float, float],
    shift_list: Sequence[int],
    macs_of: Callable[[Ranks], int | None],
    how: str,
) -> list[TRCandidate]:
    """Score every (shift, divisor).

    One first-step factorisation per shift, reused by all its divisors.
    """
    t = kernel.detach().to(torch.float64)
    norm2 = float((t * t).sum())
    allowed = [(b * b) * norm2 for b in budgets]
    out: list[TRCandidate] = []
    for s in shift_list:
        rt = t.permute(_rotation(s)).contiguous()
        n = [int(x) for x in rt.shape]
        f1 = _Factor(rt.reshape(n[0], -1), how, vectors=True)
        big_r, d1 = f1.keep(allowed[0])
        c1 = f1.carry(big_r)
        for r0 in _divisors(big_r):
            r1 = big_r // r0
            f2 = _Factor(_regroup(c1, r0, r1, n[1:]).reshape(r1 * n[1], -1), how, vectors=True)
            r2, d2 = f2.keep(allowed[1])
            # signs of this carry's rows do not change the next spectrum: skip the convention
            f3 = _Factor(
                f2.carry(r2, signed=False).reshape(r2 * n[2], n[3] * r0), how, vectors=False
            )
            r3, d3 = f3.keep(allowed[2])
            _, fixed = _unrotate([rt] * 4, (r0, r1, r2, r3), s)
            err = math.sqrt(max(d1 + d2 + d3, 0.0) / norm2) if norm2 > 0 else 0.0
            out.append(TRCandidate(s, r0, fixed, tr_params(shape, fixed), macs_of(fixed), err))
    return out
