"""Per-layer planning: candidate layers for one convolution, rank rule -> ranks, the size and
latency guards, the swap check, and the plan entries (dense ones with their reason)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from tensorcut.compression import cost
from tensorcut.compression.config import CompressConfig
from tensorcut.compression.plan import LayerPlan
from tensorcut.compression.rank import RankRule, align_ranks, clamp_ranks, ranks_for_ratio
from tensorcut.compression.verify import Capture, check_swap
from tensorcut.errors import ConvergenceError, TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.layers import FactorizedConv2d, get_method, list_methods


def rel_error(w: torch.Tensor, layer: FactorizedConv2d) -> float:
    rec = layer.reconstruct_weight().detach().to(torch.float64)
    w = w.detach().to(torch.float64)
    n = float(w.norm())
    return float((w - rec).norm()) / n if n > 0 else 0.0


def time_ms(mod: nn.Module, x: torch.Tensor, reps: int = 10) -> float:
    with torch.no_grad():
        for _ in range(2):
            mod(x)
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            mod(x)
            best = min(best, time.perf_counter() - t)
    return best * 1e3


def _explicit_ranks(rule: RankRule, n: int) -> tuple[int, ...]:
    """The ranks of an explicit rank rule, one per mode (an int repeated ``n`` times)."""
    r = cast("int | tuple[int, ...]", rule.rank)
    return (r,) * n if isinstance(r, int) else tuple(r)


class Builder:
    """Builds (and caches) factorized layers for one conv; turns failures into reasons."""

    def __init__(
        self, name: str, conv: nn.Conv2d, cfg: CompressConfig, hws: Sequence[tuple[int, int]] = ()
    ) -> None:
        self.name, self.conv, self.cfg = name, conv, cfg
        self.hws = list(hws) or [(32, 32)]
        self.hw = self.hws[0]
        self.geom = ConvGeometry.from_conv(conv)
        self.cache: dict[tuple[str, tuple[int, ...], bool], FactorizedConv2d] = {}
        self.kind = "nn.Conv2d"  # what the module computes (tensorcut.compression.effective)

    def dense_macs(self) -> int:
        """MACs of the dense convolution over every call of the forward pass."""
        return sum(cost.dense_conv_macs(self.geom, hw) for hw in self.hws)

    def macs(self, method: str, ranks: Sequence[int]) -> int:
        """MACs of the factorized layer at ``ranks`` over every call of the forward pass."""
        return sum(cost.factorized_macs(self.cls(method), self.geom, ranks, hw) for hw in self.hws)

    def params(self, method: str, ranks: Sequence[int]) -> int:
        """Stored parameters of the factorized layer at ``ranks``."""
        return cost.factorized_params(self.cls(method), self.geom, ranks)

    def cls(self, method: str) -> type[FactorizedConv2d]:
        return get_method(method)

    def build(
        self, method: str, ranks: tuple[int, ...] | None = None, *, fast: bool = False, **rule: Any
    ) -> FactorizedConv2d:
        """The factorized layer; ``fast`` trades a little accuracy for speed (HOSVD without HOOI,
        fewer ALS sweeps) — used only to rank budget candidates, never for the applied layer."""
        cls = self.cls(method)
        cls.check_geometry(self.geom)
        align = self.cfg.align
        if align > 1 and ranks is not None:
            ranks = align_ranks(ranks, self.cls(method).max_ranks(self.geom), align)
        key = (method, ranks, fast) if ranks is not None else None
        if key is not None and key in self.cache:
            return self.cache[key]
        options = self.cfg.method_options(method)
        opts = cls.decompose_kwargs(
            options.fast() if fast else options, hw=self.hw, explicit_ranks=ranks is not None
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = self.cls(method).from_conv(self.conv, ranks=ranks, **rule, **opts)
        if (
            align > 1 and ranks is None
        ):  # an error rule chose the ranks: round up, so the bound still holds
            up = align_ranks(layer.ranks, self.cls(method).max_ranks(self.geom), align, up=True)
            if up != tuple(layer.ranks):
                return self.build(method, up, fast=fast)
        self.cache[(method, tuple(layer.ranks), fast)] = layer
        return layer


def ranks_for(
    b: Builder, method: str, rule: RankRule
) -> tuple[tuple[int, ...] | None, str, dict[str, Any]]:
    """Ranks for ``method`` under ``rule``: (ranks or None to let from_conv decide, clamp note,
    from_conv kwargs).
    """
    cls = b.cls(method)
    mx = tuple(cls.max_ranks(b.geom))
    if rule.kind == "rank":
        req = _explicit_ranks(rule, len(mx))
        if len(req) != len(mx):
            raise TensorcutError(
                f"{method} takes {len(mx)} ranks "
                f"{'(' + ', '.join('r' + str(i) for i in range(len(mx))) + ')'}, got {len(req)}: "
                f"{req}"
            )
        r, note = clamp_ranks(req, mx)
        return r, note, {}
    if rule.kind == "full":
        return mx, "", {}
    if rule.kind == "vbmf":
        r, note = clamp_ranks(cls.vbmf_ranks(b.conv.weight), mx)
        return r, note, {}
    if rule.kind == "ratio":
        target = rule.ratio * b.geom.dense_params()  # type: ignore[operator]
        r = ranks_for_ratio(mx, lambda r: b.params(method, r), target, b.cfg.align)
        p = b.params(method, r)
        note = (
            f"align={b.cfg.align} needs ranks >= {b.cfg.align}: {p:,} params > target {target:,.0f}"
            if (b.cfg.align > 1 and p > target)
            else ""
        )
        return r, note, {}
    if rule.kind == "eps":
        return None, "", {"eps": rule.eps}
    if rule.kind == "energy":
        return None, "", {"energy": rule.energy}
    raise TensorcutError(f"rank rule {rule.kind!r} cannot pick ranks for one layer")


def make_entry(
    name: str,
    b: Builder,
    hw: tuple[int, int],
    method: str,
    status: str,
    reason: str,
    ranks: Sequence[int] = (),
    layer: FactorizedConv2d | None = None,
    note: str = "",
) -> LayerPlan:
    g = b.geom
    pa = ma = 0
    err = None
    options: dict[str, Any] = {}
    if layer is not None:
        options = layer.rebuild_options()
        pa = b.params(method, tuple(layer.ranks))
        ma = b.macs(method, tuple(layer.ranks))
        err = rel_error(b.conv.weight, layer)
        ranks = tuple(layer.ranks)
    return LayerPlan(
        name=name,
        method=method,
        status=status,
        reason=reason,
        ranks=[int(r) for r in ranks],
        params_before=g.dense_params(),
        params_after=pa,
        macs_before=b.dense_macs(),
        macs_after=ma,
        error=err,
        geometry=g.to_dict(),
        input_hw=list(hw),
        note=note,
        options=options,
        calls=len(b.hws),
    )


def decide_one(
    name: str, b: Builder, hw: tuple[int, int], cfg: CompressConfig, rule: RankRule
) -> tuple[LayerPlan, nn.Module | None]:
    """Plan one layer under a per-layer rule (not a budget)."""
    methods = list_methods(auto=True) if cfg.method == "auto" else [cfg.method]
    best: tuple[LayerPlan, nn.Module] | None = None
    reasons = []
    for method in methods:
        try:
            ranks, note, kw = ranks_for(b, method, rule)
            layer = b.build(method, ranks, **kw)
        except ConvergenceError as e:
            if cfg.fallback and cfg.method == method and b.cls(method).fallback:
                fb = fallback_entry(name, b, hw, rule, method, e)
                if isinstance(fb, str):
                    reasons.append(fb)
                elif best is None or fb[0].params_after < best[0].params_after:
                    best = fb
                continue
            reasons.append(f"{method}: did not converge ({e})")
            continue
        except TensorcutError as e:
            reasons.append(f"{method}: {e}")
            continue
        entry = make_entry(name, b, hw, method, "factorize", "", layer=layer, note=note)
        if cfg.method == "auto" and rule.kind == "ratio":
            better = best is None or (entry.error or 0) < (best[0].error or 0)
        else:
            better = best is None or entry.params_after < best[0].params_after
        if better:
            best = (entry, layer)
    if best is None:
        return make_entry(
            name, b, hw, cfg.method, "dense", "; ".join(reasons) or "no method applies"
        ), None
    return best


def fallback_entry(
    name: str, b: Builder, hw: tuple[int, int], rule: RankRule, failed: str, err: Exception
) -> tuple[LayerPlan, nn.Module] | str:
    """The ``fallback`` method of ``failed`` in place of its decomposition that did not converge,
    at the same parameter share for explicit ranks."""
    other = b.cls(failed).fallback
    assert other is not None
    try:
        if rule.kind == "rank":
            n = len(b.cls(failed).max_ranks(b.geom))
            r = _explicit_ranks(rule, n)
            rule = RankRule(ratio=min(0.99, b.params(failed, r) / b.geom.dense_params()))
        ranks, _, kw = ranks_for(b, other, rule)
        layer = b.build(other, ranks, **kw)
    except (TensorcutError, ConvergenceError) as e2:
        return f"{failed}: did not converge ({err}); {other} fallback failed ({e2})"
    return make_entry(
        name,
        b,
        hw,
        other,
        "factorize",
        "",
        layer=layer,
        note=f"{failed} did not converge ({err}); fell back to {other}",
    ), layer


def smallest_within(
    name: str, b: Builder, hw: tuple[int, int], entry: LayerPlan, layer: nn.Module
) -> tuple[LayerPlan, nn.Module]:
    """Among the auto methods, the fewest parameters with kernel error at most ``entry.error``."""
    share = float(entry.error or 0.0)
    if share <= 0:
        return entry, layer
    for method in list_methods(auto=True):
        if method == entry.method:
            continue
        try:
            ranks, _, kw = ranks_for(b, method, RankRule(eps=min(share * 0.999, 0.999)))
            cand = b.build(method, ranks, **kw)
        except (TensorcutError, ConvergenceError):
            continue
        e = make_entry(name, b, hw, method, "factorize", "", layer=cand)
        if e.error is not None and e.error <= share + 1e-9 and e.params_after < entry.params_after:
            entry, layer = e, cand
    return entry, layer


def finalize(
    entry: LayerPlan, b: Builder, layer: nn.Module | None, cfg: CompressConfig, hw: tuple[int, int]
) -> LayerPlan:
    """Size and latency guards: a factorization that is not smaller (or not faster) stays dense."""
    if entry.status != "factorize" or layer is None:
        return entry
    if cfg.rule.kind == "full":
        if entry.params_after >= entry.params_before:
            entry.note = (
                entry.note + "; " if entry.note else ""
            ) + "rank='full': exact but not smaller (for verification)"
    elif entry.params_after >= entry.params_before:
        entry.status = "dense"
        entry.reason = (
            f"{entry.method} form would not be smaller "
            f"({entry.params_after:,} >= {entry.params_before:,} params)"
        )
        return entry
    if cfg.latency:
        dev = b.conv.weight.device
        x = torch.randn(32, b.geom.in_channels, *hw, device=dev, dtype=b.conv.weight.dtype)
        td = time_ms(b.conv, x)
        tf = time_ms(layer, x)
        entry.latency_ms = {"dense": td, "factorized": tf}
        if tf >= td:
            entry.status = "dense"
            entry.reason = (
                f"{entry.method} form not faster on {dev.type} "
                f"({tf:.2f} ms >= {td:.2f} ms at batch 32)"
            )
    return entry


def dense_entry(
    name: str, module: nn.Module, reason: str, kind: str, unit: cost.UnitCost | None
) -> LayerPlan:
    g = ConvGeometry.from_conv(module)  # type: ignore[arg-type]
    return LayerPlan(
        name=name,
        method="-",
        status="dense",
        reason=reason,
        ranks=[],
        params_before=cost.unit_params(module),
        params_after=0,
        macs_before=unit.macs if unit else 0,
        macs_after=0,
        error=None,
        geometry=g.to_dict(),
        input_hw=[],
        kind=kind,
        calls=unit.calls if unit else 0,
    )


def verify_entry(
    e: LayerPlan, b: Builder, layer: nn.Module, cap: Capture, module: nn.Module
) -> None:
    """Check the swap on the module's captured input; a failed check leaves the layer dense."""
    x, y = cap.inputs.get(id(module)), cap.outputs.get(id(module))
    if x is None or y is None:
        e.status, e.reason = (
            "dense",
            "its input or output could not be captured (not a single tensor); left dense",
        )
        return
    kh, kw = b.geom.kernel_size
    chk = check_swap(b.conv, layer, x, y, chain=sum(int(r) for r in e.ranks) * kh * kw)
    if not chk.ok:
        e.status, e.reason = "dense", chk.reason
        return
    e.output_error = chk.output_error


def warn_poor(entries: Sequence[LayerPlan], rule_kind: str) -> None:
    """Flag results a user would not want silently: near-total kernel error, more MACs than
    dense."""
    if rule_kind == "full":
        return
    fact = [e for e in entries if e.status == "factorize"]
    bad = [e for e in fact if e.error is not None and e.error > 0.9]
    for e in bad:
        e.note = (
            e.note + "; " if e.note else ""
        ) + f"kernel error {e.error:.3f}: almost nothing of the kernel is kept"
    more = [e for e in fact if e.macs_after > e.macs_before]
    for e in more:
        e.note = (
            e.note + "; " if e.note else ""
        ) + f"more MACs than dense ({e.macs_after:,} > {e.macs_before:,})"
    if bad:
        warnings.warn(
            f"{len(bad)} layer(s) keep almost nothing of their kernel (relative error > 0.9, e.g. "
            f"{bad[0].name}: "
            f"{bad[0].error:.3f}); expect accuracy near chance before fine-tuning — use a milder "
            "rank rule",
            UserWarning,
            stacklevel=3,
        )
    if more:
        warnings.warn(
            f"{len(more)} factorized layer(s) need more MACs than the dense layer (e.g. "
            f"{more[0].name}: "
            f"{more[0].macs_after:,} > {more[0].macs_before:,}); use smaller ranks or "
            "budget_kind='macs'",
            UserWarning,
            stacklevel=3,
        )
