"""plan / apply / compress: decide which convolutions to factorize and how, then swap them.

Shaped like torchao's ``quantize_``: one config object, one filter function.
``plan`` is pure (the model is not changed) and returns a JSON-serialisable :class:`Plan`;
``apply`` performs the module swap; ``compress`` does both.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tensorcut import cost
from tensorcut.effective import Resolved, resolve
from tensorcut.errors import ConvergenceError, TensorcutError
from tensorcut.layers.base import LAYER_REGISTRY, ConvGeometry, FactorizedConv2d
from tensorcut.rank import (
    Candidate,
    LayerLadder,
    RankRule,
    align_ranks,
    allocate_budget,
    clamp_ranks,
    ranks_for_ratio,
    scaled_ranks,
    vbmf_tucker2_ranks,
)
from tensorcut.verify import Capture, capture, check_swap, relative_difference

__all__ = [
    "CompressConfig",
    "LayerPlan",
    "Plan",
    "apply",
    "compress",
    "decompress",
    "default_filter",
    "plan",
]

AUTO_METHODS = ("cp", "tucker2", "tt", "tr")
BUDGET_SCALES = (1.0, 0.75, 0.55, 0.4, 0.3, 0.22, 0.16, 0.12, 0.08, 0.05, 0.03, 0.015)

FilterFn = Callable[[str, nn.Module], bool]

#: Cheaper decomposition settings for scoring budget candidates (the applied layers use the full ones).
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "tucker2": {"hooi": False},
    "tucker": {"hooi": False},
    "cp": {"n_iter_max": 25},
}


def _methods() -> list[str]:
    import tensorcut.layers  # noqa: F401  (registers the layer classes)

    return sorted(LAYER_REGISTRY)


def default_filter(name: str, module: nn.Module) -> bool:
    """Every Conv2d except stems (<= 3 input channels), which hold few parameters and are sensitive.

    Depthwise convolutions and modules tensorcut cannot reproduce are listed in the plan as dense
    with their reason rather than filtered out here."""
    return isinstance(module, nn.Conv2d) and module.in_channels > 3


@dataclass
class CompressConfig:
    """What to factorize and how. Exactly one rank rule (``rank``/``ratio``/``eps``/``energy``) or a ``budget``.

    ``budget`` below 1 is a fraction of the eligible layers' dense cost, otherwise an
    absolute count of ``budget_kind`` ('params' or 'macs'). ``latency=True`` keeps a layer
    dense when its factorized form is not faster on the current device. ``align`` > 1 rounds
    every rank to a multiple of ``align`` (8 or 16 suit SIMD units): down for the size rules
    (rank, ratio, vbmf, budget), up for the error rules (eps, energy), within each mode's maximum.
    ``rank='full'`` takes each layer's maximal ranks (an exact factorization for Tucker-2, Tucker
    and TT, applied even where it is larger than the dense layer: a verification tool).
    ``allow_custom_forward=True`` reads a Conv2d subclass with an unknown ``forward`` as a plain
    convolution (each swap is still verified on real inputs; by default such modules stay dense).
    """

    method: str = "tucker2"
    rank: int | tuple[int, ...] | str | None = None
    ratio: float | None = None
    eps: float | None = None
    energy: float | None = None
    budget: float | None = None
    budget_kind: str = "params"
    latency: bool = False
    align: int = 1
    cp_fallback: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    allow_custom_forward: bool = False

    def __post_init__(self) -> None:
        methods = sorted(_methods() + ["auto"])
        if self.method not in methods:
            raise TensorcutError(
                f"unknown method {self.method!r}; choose one of: {', '.join(methods)}"
            )
        if isinstance(self.rank, list):
            self.rank = tuple(self.rank)
        self.rule  # validates the rank options
        if self.budget is not None:
            if self.rule.kind != "none":
                raise TensorcutError(
                    f"contradictory rank options: budget and {self.rule.kind}; give one of them"
                )
            if not self.budget > 0:
                raise TensorcutError(f"budget must be > 0, got {self.budget}")
            if self.budget_kind not in ("params", "macs"):
                raise TensorcutError(
                    f"budget kind must be 'params' or 'macs', got {self.budget_kind!r}"
                )
        elif self.rule.kind == "none":
            raise TensorcutError(
                "no rank rule: give one of rank, ratio, eps, energy, rank='vbmf', or a budget"
            )
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise TensorcutError(
                f"align must be a positive integer (e.g. 8 or 16), got {self.align!r}"
            )
        if not isinstance(self.allow_custom_forward, bool):
            raise TensorcutError(
                f"allow_custom_forward must be True or False, got {self.allow_custom_forward!r}"
            )
        if self.rule.kind == "vbmf" and self.method != "tucker2":
            raise TensorcutError(
                f"rank='vbmf' applies to Tucker-2 only; use method='tucker2' (got {self.method!r})"
            )

    @property
    def rule(self) -> RankRule:
        """The validated rank rule."""
        return RankRule(rank=self.rank, ratio=self.ratio, eps=self.eps, energy=self.energy)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = asdict(self)
        if isinstance(self.rank, tuple):
            d["rank"] = list(self.rank)
        return d


@dataclass
class LayerPlan:
    """The decision for one layer."""

    name: str
    method: str
    status: str  # "factorize" | "dense"
    reason: str
    ranks: list[int]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    error: float | None
    geometry: dict[str, Any]
    input_hw: list[int]
    note: str = ""
    sensitivity: float | None = None
    latency_ms: dict[str, float] | None = None
    options: dict[str, Any] = field(
        default_factory=dict
    )  # rebuild options beyond the ranks (TR: the RSDTR shift)
    output_error: float | None = None  # measured ||y~ - y|| / ||y|| on the layer's captured input
    kind: str = ""  # what the module computes (tensorcut.effective), e.g. "timm StdConv2d (standardised kernel)"
    aliases: list[str] = field(
        default_factory=list
    )  # further names of the same module (shared convs)
    calls: int = 1  # calls per forward pass (MACs count every call)

    @property
    def ratio(self) -> float:
        """Parameter compression ratio (PCR) of this layer: dense / stored parameters."""
        return self.params_before / self.params_after if self.params_after else 1.0

    @property
    def mac_ratio(self) -> float:
        """FLOPs compression ratio (FCR) of this layer: dense / factorized MACs."""
        return self.macs_before / self.macs_after if self.macs_after else 1.0


@dataclass
class Plan:
    """Per-layer decisions plus the config and totals. JSON round-trips through :meth:`to_json`."""

    config: dict[str, Any]
    layers: list[LayerPlan]
    input_shape: list[int]
    model_params: int
    model_macs: int
    model_output_error: float | None = (
        None  # set by compress: ||y~ - y|| / ||y|| of the whole model on the calibration batch
    )
    _built: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)
    # the capture pass's input and the dense model's output on it, reused by compress's whole-model check
    _reference: tuple[tuple[Any, ...], Any] | None = field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------- totals
    def totals(self) -> dict[str, Any]:
        """Conv-layer and whole-model parameter / MAC totals before and after."""
        pb = sum(l.params_before for l in self.layers)
        pa = sum(
            l.params_after if l.status == "factorize" else l.params_before for l in self.layers
        )
        mb = sum(l.macs_before for l in self.layers)
        ma = sum(l.macs_after if l.status == "factorize" else l.macs_before for l in self.layers)
        return {
            "conv_params_before": pb,
            "conv_params_after": pa,
            "conv_ratio": pb / pa if pa else 1.0,
            "conv_macs_before": mb,
            "conv_macs_after": ma,
            "conv_mac_ratio": mb / ma if ma else 1.0,
            "model_params_before": self.model_params,
            "model_params_after": self.model_params - pb + pa,
            "model_ratio": self.model_params / (self.model_params - pb + pa),
            "model_macs_before": self.model_macs,
            "model_macs_after": self.model_macs - mb + ma,
            "model_mac_ratio": self.model_macs / (self.model_macs - mb + ma)
            if (self.model_macs - mb + ma)
            else 1.0,
            "factorized_layers": sum(l.status == "factorize" for l in self.layers),
            "dense_layers": sum(l.status != "factorize" for l in self.layers),
        }

    def table(self) -> str:
        """Human-readable per-layer table (listed conv layers only) with totals."""
        head = (
            "layer",
            "method",
            "ranks",
            "params",
            "->",
            "PCR",
            "MACs ->",
            "FCR",
            "rel.err",
            "out.err",
            "decision",
        )
        rows = []
        for l in self.layers:
            fact = l.status == "factorize"
            rows.append(
                (
                    l.name,
                    l.method if fact else "-",
                    "x".join(map(str, l.ranks)) if fact else "-",
                    f"{l.params_before:,}",
                    f"{l.params_after:,}" if fact else "=",
                    f"{l.ratio:.2f}" if fact else "1.00",
                    f"{l.macs_after:,}" if fact else "=",
                    f"{l.mac_ratio:.2f}" if fact else "1.00",
                    f"{l.error:.4f}" if (fact and l.error is not None) else "-",
                    f"{l.output_error:.4f}" if (fact and l.output_error is not None) else "-",
                    "factorize" + (f" ({l.note})" if l.note else "")
                    if fact
                    else f"dense: {l.reason}",
                )
            )
        t = self.totals()
        rows.append(
            (
                "conv layers",
                "",
                "",
                f"{t['conv_params_before']:,}",
                f"{t['conv_params_after']:,}",
                f"{t['conv_ratio']:.2f}",
                f"{t['conv_macs_after']:,}",
                f"{t['conv_mac_ratio']:.2f}",
                "",
                "",
                "",
            )
        )
        rows.append(
            (
                "whole model",
                "",
                "",
                f"{t['model_params_before']:,}",
                f"{t['model_params_after']:,}",
                f"{t['model_ratio']:.2f}",
                f"{t['model_macs_after']:,}",
                f"{t['model_mac_ratio']:.2f}",
                "",
                "",
                "",
            )
        )
        w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        lines = [
            "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in [head, *rows]
        ]
        lines.insert(1, "  ".join("-" * x for x in w))
        lines.append(
            "PCR = dense / stored parameters; FCR = dense / factorized MACs; rel.err = ||W - W~||_F / ||W||_F of the kernel; "
            "out.err = ||y~ - y|| / ||y|| of the layer's output on its captured calibration input; MACs per image at input "
            + "x".join(map(str, self.input_shape))
            + "."
        )
        return "\n".join(lines)

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "format": "tensorcut-plan",
            "version": 1,
            "config": self.config,
            "input_shape": self.input_shape,
            "model_params": self.model_params,
            "model_macs": self.model_macs,
            "model_output_error": self.model_output_error,
            "layers": [asdict(l) for l in self.layers],
            "totals": self.totals(),
        }

    def to_json(self) -> str:
        """Pretty JSON."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`; a malformed plan raises TensorcutError."""
        if not isinstance(d, dict) or d.get("format") != "tensorcut-plan":
            raise TensorcutError("not a tensorcut plan (missing format='tensorcut-plan')")
        try:
            layers = [LayerPlan(**l) for l in d["layers"]]
            err = d.get("model_output_error")
            return cls(
                config=d["config"],
                layers=layers,
                input_shape=list(d["input_shape"]),
                model_params=int(d["model_params"]),
                model_macs=int(d["model_macs"]),
                model_output_error=None if err is None else float(err),
            )
        except (KeyError, TypeError) as e:
            raise TensorcutError(f"malformed plan: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write the plan atomically as JSON."""
        from tensorcut.io import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan written by :meth:`save`."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TensorcutError(
                f"cannot read plan {path}: {type(e).__name__}: {str(e)[:160]}"
            ) from None


# ----------------------------------------------------------------------------- helpers


def _rel_error(w: torch.Tensor, layer: nn.Module) -> float:
    rec = layer.reconstruct_weight().detach().to(torch.float64)
    w = w.detach().to(torch.float64)
    n = float(w.norm())
    return float((w - rec).norm()) / n if n > 0 else 0.0


def _time_ms(mod: nn.Module, x: torch.Tensor, reps: int = 10) -> float:
    with torch.no_grad():
        for _ in range(2):
            mod(x)
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            mod(x)
            best = min(best, time.perf_counter() - t)
    return best * 1e3


class _Builder:
    """Builds (and caches) factorized layers for one conv; turns failures into reasons."""

    def __init__(
        self, name: str, conv: nn.Conv2d, cfg: CompressConfig, hws: Sequence[tuple[int, int]] = ()
    ) -> None:
        self.name, self.conv, self.cfg = name, conv, cfg
        self.hws = list(hws) or [(32, 32)]
        self.hw = self.hws[0]
        self.geom = ConvGeometry.from_conv(conv)
        self.cache: dict[tuple[str, tuple[int, ...]], nn.Module] = {}
        self.kind = "nn.Conv2d"  # what the module computes (tensorcut.effective)

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
        return LAYER_REGISTRY[method]

    def build(
        self, method: str, ranks: tuple[int, ...] | None = None, *, fast: bool = False, **rule: Any
    ) -> nn.Module:
        """The factorized layer; ``fast`` trades a little accuracy for speed (HOSVD without HOOI,
        fewer ALS sweeps) — used only to rank budget candidates, never for the applied layer."""
        if self.geom.dynamic and method == "tr":
            raise TensorcutError(
                "TR does not support TF-same padding at stride > 1 (padding computed from the "
                "input size); use tucker2, tucker, cp or tt for this layer"
            )
        align = self.cfg.align
        if align > 1 and ranks is not None:
            ranks = align_ranks(ranks, self.cls(method).max_ranks(self.geom), align)
        key = (method, ranks, fast) if ranks is not None else None
        if key is not None and key in self.cache:
            return self.cache[key]
        opts = dict(self.cfg.options.get(method, {}))
        if (
            method == "tr"
            and opts.get("objective") == "macs"
            and "input_size" not in opts
            and self.hw is not None
        ):
            opts["input_size"] = tuple(self.hw)  # each layer's own input size
        if ranks is not None and method == "tr":
            opts = {
                k: v for k, v in opts.items() if k == "shift"
            }  # explicit ranks fix the ring; search options do not apply
        if fast:
            opts.update(FAST_OPTIONS.get(method, {}))
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


def _ranks_for(
    b: _Builder, method: str, rule: RankRule
) -> tuple[tuple[int, ...] | None, str, dict[str, Any]]:
    """Ranks for ``method`` under ``rule``: (ranks or None to let from_conv decide, clamp note, from_conv kwargs)."""
    cls = b.cls(method)
    mx = tuple(cls.max_ranks(b.geom))
    if rule.kind == "rank":
        req = (rule.rank,) * len(mx) if isinstance(rule.rank, int) else tuple(rule.rank)  # type: ignore[arg-type]
        if len(req) != len(mx):
            raise TensorcutError(
                f"{method} takes {len(mx)} ranks {'(' + ', '.join('r' + str(i) for i in range(len(mx))) + ')'}, got {len(req)}: {req}"
            )
        r, note = clamp_ranks(req, mx)
        return r, note, {}
    if rule.kind == "full":
        return mx, "", {}
    if rule.kind == "vbmf":
        r, note = clamp_ranks(vbmf_tucker2_ranks(b.conv.weight), mx)
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


def _entry(
    name: str,
    b: _Builder,
    hw: tuple[int, int],
    method: str,
    status: str,
    reason: str,
    ranks: Sequence[int] = (),
    layer: nn.Module | None = None,
    note: str = "",
) -> LayerPlan:
    g = b.geom
    pa = ma = 0
    err = None
    options: dict[str, Any] = {}
    if layer is not None:
        res = getattr(layer, "tr_result", None)
        if res is not None:
            options = {"shift": int(res.shift)}
        pa = b.params(method, tuple(layer.ranks))
        ma = b.macs(method, tuple(layer.ranks))
        err = _rel_error(b.conv.weight, layer)
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


def _decide_one(
    name: str, b: _Builder, hw: tuple[int, int], cfg: CompressConfig, rule: RankRule
) -> tuple[LayerPlan, nn.Module | None]:
    """Plan one layer under a per-layer rule (not a budget)."""
    methods = AUTO_METHODS if cfg.method == "auto" else (cfg.method,)
    best: tuple[LayerPlan, nn.Module] | None = None
    reasons = []
    for method in methods:
        try:
            ranks, note, kw = _ranks_for(b, method, rule)
            layer = b.build(method, ranks, **kw)
        except ConvergenceError as e:
            if method == "cp" and cfg.cp_fallback and cfg.method == "cp":
                fb = _cp_fallback(name, b, hw, rule, e)
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
        entry = _entry(name, b, hw, method, "factorize", "", layer=layer, note=note)
        if cfg.method == "auto" and rule.kind == "ratio":
            better = best is None or (entry.error or 0) < (best[0].error or 0)
        else:
            better = best is None or entry.params_after < best[0].params_after
        if better:
            best = (entry, layer)
    if best is None:
        return _entry(
            name, b, hw, cfg.method, "dense", "; ".join(reasons) or "no method applies"
        ), None
    return best


def _cp_fallback(
    name: str, b: _Builder, hw: tuple[int, int], rule: RankRule, err: Exception
) -> tuple[LayerPlan, nn.Module] | str:
    """Tucker-2 in place of a CP decomposition that failed, at the same parameter share for explicit ranks."""
    try:
        if rule.kind == "rank":
            cp = b.cls("cp")
            r = (rule.rank,) if isinstance(rule.rank, int) else tuple(rule.rank)  # type: ignore[arg-type]
            rule = RankRule(ratio=min(0.99, b.params("cp", r) / b.geom.dense_params()))
        ranks, _, kw = _ranks_for(b, "tucker2", rule)
        layer = b.build("tucker2", ranks, **kw)
    except (TensorcutError, ConvergenceError) as e2:
        return f"cp: did not converge ({err}); Tucker-2 fallback failed ({e2})"
    return _entry(
        name,
        b,
        hw,
        "tucker2",
        "factorize",
        "",
        layer=layer,
        note=f"CP did not converge ({err}); fell back to Tucker-2",
    ), layer


def _smallest_within(
    name: str, b: _Builder, hw: tuple[int, int], entry: LayerPlan, layer: nn.Module
) -> tuple[LayerPlan, nn.Module]:
    """Among the auto methods, the fewest parameters with kernel error at most ``entry.error``."""
    share = float(entry.error or 0.0)
    if share <= 0:
        return entry, layer
    for method in AUTO_METHODS:
        if method == entry.method:
            continue
        try:
            ranks, _, kw = _ranks_for(b, method, RankRule(eps=min(share * 0.999, 0.999)))
            cand = b.build(method, ranks, **kw)
        except (TensorcutError, ConvergenceError):
            continue
        e = _entry(name, b, hw, method, "factorize", "", layer=cand)
        if e.error is not None and e.error <= share + 1e-9 and e.params_after < entry.params_after:
            entry, layer = e, cand
    return entry, layer


def _finalize(
    entry: LayerPlan, b: _Builder, layer: nn.Module | None, cfg: CompressConfig, hw: tuple[int, int]
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
        entry.reason = f"{entry.method} form would not be smaller ({entry.params_after:,} >= {entry.params_before:,} params)"
        return entry
    if cfg.latency:
        dev = b.conv.weight.device
        x = torch.randn(32, b.geom.in_channels, *hw, device=dev, dtype=b.conv.weight.dtype)
        td = _time_ms(b.conv, x)
        tf = _time_ms(layer, x)
        entry.latency_ms = {"dense": td, "factorized": tf}
        if tf >= td:
            entry.status = "dense"
            entry.reason = f"{entry.method} form not faster on {dev.type} ({tf:.2f} ms >= {td:.2f} ms at batch 32)"
    return entry


def _calibration_args(
    model: nn.Module,
    input_shape: Sequence[int] | None,
    calibration: torch.Tensor | tuple[Any, ...] | None,
) -> tuple[tuple[Any, ...], list[int]]:
    """The positional arguments of the capture forward pass and the per-image input shape."""
    ref = next(iter(model.parameters()), None)
    kw: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    if ref is not None and ref.device.type == "meta":
        raise TensorcutError(
            "the model's parameters are on the 'meta' device (no values); load or materialise "
            "its weights (e.g. model.to_empty(device='cpu') then load a state_dict) before compressing"
        )
    if input_shape is not None:
        shape = tuple(input_shape)
        if len(shape) != 3 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape
        ):
            raise TensorcutError(
                f"input_shape must be (C, H, W) of one image, three positive ints; got {tuple(input_shape)!r}"
            )
    if calibration is None:
        if input_shape is None:
            first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
            c = first.in_channels if first is not None else 3
            input_shape = (c, 32, 32)
            warnings.warn(
                f"no input_shape or calibration batch given: assuming one {c}x32x32 image per sample; "
                "MAC counts and the checks of each swap depend on it, so pass input_shape=(C, H, W)",
                UserWarning,
                stacklevel=3,
            )
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, *input_shape, generator=gen)
        return (x.to(**kw) if kw else x,), [int(v) for v in input_shape]
    args = calibration if isinstance(calibration, tuple) else (calibration,)
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
        raise TensorcutError(
            "calibration must be an input batch (a tensor of shape (N, C, H, W), or a tuple of the "
            "forward's positional arguments whose first is such a tensor)"
        )
    first_t: torch.Tensor = args[0]
    if input_shape is not None and tuple(first_t.shape[1:]) != tuple(input_shape):
        raise TensorcutError(
            f"calibration batch has shape {tuple(first_t.shape)} but input_shape is {tuple(input_shape)}; "
            f"give a batch of shape (N, {', '.join(map(str, input_shape))}) or drop input_shape"
        )

    def move(
        a: Any,
    ) -> Any:  # floating tensors take the model's dtype too; other tensors only its device
        if not isinstance(a, torch.Tensor) or not kw:
            return a
        return a.to(**kw) if a.is_floating_point() else a.to(kw["device"])

    moved = tuple(move(a) for a in args)
    return moved, [int(v) for v in first_t.shape[1:]]


def _conv_modules(model: nn.Module) -> tuple[dict[str, nn.Conv2d], dict[str, list[str]], int]:
    """Every distinct Conv2d outside factorized layers by its first name, the other names of each
    (shared modules), and how many factorized layers the model already holds."""
    inside: set[int] = set()
    factorized = 0
    for m in model.modules():
        if isinstance(m, FactorizedConv2d) or (
            getattr(type(m), "method", "") and hasattr(m, "ranks")
        ):
            factorized += 1
            inside.update(id(s) for s in m.modules() if s is not m)
    first: dict[int, str] = {}
    convs: dict[str, nn.Conv2d] = {}
    aliases: dict[str, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, nn.Conv2d) or id(m) in inside:
            continue
        if id(m) in first:
            aliases[first[id(m)]].append(n)
        else:
            first[id(m)] = n
            convs[n] = m
            aliases[n] = []
    return convs, aliases, factorized


def _dense_entry(
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


def _verify_entry(
    e: LayerPlan, b: _Builder, layer: nn.Module, cap: Capture, module: nn.Module
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


def _warn_poor(entries: Sequence[LayerPlan], rule_kind: str) -> None:
    """Flag results a user would not want silently: near-total kernel error, more MACs than dense."""
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
            f"{len(bad)} layer(s) keep almost nothing of their kernel (relative error > 0.9, e.g. {bad[0].name}: "
            f"{bad[0].error:.3f}); expect accuracy near chance before fine-tuning — use a milder rank rule",
            UserWarning,
            stacklevel=3,
        )
    if more:
        warnings.warn(
            f"{len(more)} factorized layer(s) need more MACs than the dense layer (e.g. {more[0].name}: "
            f"{more[0].macs_after:,} > {more[0].macs_before:,}); use smaller ranks or budget_kind='macs'",
            UserWarning,
            stacklevel=3,
        )


def plan(
    model: nn.Module,
    config: CompressConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    calibration: torch.Tensor | tuple[Any, ...] | None = None,
    sensitivity: dict[str, float] | None = None,
    layers: Sequence[str] | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> Plan:
    """Decide, per convolution, the method and ranks (the model is not modified).

    Each selected module is first resolved to the plain convolution it computes
    (:mod:`tensorcut.effective`; unknown subclasses stay dense with their reason), and every
    proposed swap is checked on the layer's real input captured from one forward pass
    (:mod:`tensorcut.verify`); the measured output error is recorded per layer.

    Args:
        model: any module with ``nn.Conv2d`` layers (timm and torchvision networks included).
        config: a :class:`CompressConfig`, or give its fields as keyword arguments.
        filter_fn: ``filter_fn(name, module) -> bool`` selects layers (default :func:`default_filter`).
        input_shape: (C, H, W) of one image, for MACs and the checks (default: from ``calibration``,
            else the first conv's channels at 32x32, with a warning).
        calibration: an input batch ``(N, C, H, W)`` (or a tuple of the forward's positional
            arguments) whose activations are captured to check every swap; default: two random images.
        sensitivity: layer name -> weight (e.g. accuracy drop per norm loss from the truncation
            study): under a budget, sensitive layers are compressed more mildly.
        layers: explicit layer names instead of ``filter_fn``.
        progress: show a progress bar (on a terminal).

    Returns:
        A JSON-serialisable :class:`Plan`.

    Raises:
        TensorcutError: bad options, no conv layer, a filter that selects nothing, a calibration
            batch of the wrong shape, or a forward pass that fails on the given input.

    Example:
        >>> p = plan(model, method="tucker2", ratio=0.3, input_shape=(3, 32, 32))
        >>> print(p.table())
    """
    cfg = config or CompressConfig(**kwargs)
    if config is not None and kwargs:
        raise TensorcutError("give either a CompressConfig or keyword options, not both")
    convs, aliases, factorized = _conv_modules(model)
    if not convs:
        if factorized:
            raise TensorcutError(
                f"the model is already compressed ({factorized} factorized layers, no dense Conv2d left); "
                "compress the dense original, or tensorcut.decompress(model) first"
            )
        raise TensorcutError("the model has no Conv2d layers to compress")
    primary = {a: n for n, al in aliases.items() for a in (n, *al)}
    if layers is not None:
        unknown = [n for n in layers if n not in primary]
        if unknown:
            raise TensorcutError(
                f"unknown layer {unknown[0]!r}; conv layers are: {', '.join(convs)}"
            )
        chosen = list(dict.fromkeys(primary[n] for n in layers))
    else:
        f = filter_fn or default_filter
        chosen = [n for n, m in convs.items() if f(n, m) or any(f(a, m) for a in aliases[n])]
    if not chosen:
        raise TensorcutError(
            "the filter selected no conv layer; nothing to compress (the default skips stems with <= 3 input channels)"
        )
    args, shape = _calibration_args(model, input_shape, calibration)
    cap = capture(model, [convs[n] for n in chosen], args)
    mc = cost.model_cost(model, example=args)
    units = {id(u.module): u for u in mc.units}
    entries: dict[str, LayerPlan] = {}
    builders: dict[str, _Builder] = {}
    for n in chosen:
        m = convs[n]
        r = resolve(m, allow_custom_forward=cfg.allow_custom_forward)
        kind = r.kind if isinstance(r, Resolved) else ""
        if isinstance(r, str):
            entries[n] = _dense_entry(n, m, r, kind, units.get(id(m)))
        elif id(m) not in cap.sizes:
            entries[n] = _dense_entry(
                n, m, "not called by forward on the calibration input; left dense", kind, None
            )
        else:
            builders[n] = _Builder(n, r.conv, cfg, cap.sizes[id(m)])
            builders[n].kind = kind
    built: dict[str, nn.Module] = {}
    rule = cfg.rule
    todo = [n for n in chosen if n in builders]
    it = tqdm(todo, desc="plan", leave=False, disable=None if progress else True)
    if cfg.budget is None:
        for n in it:
            b = builders[n]
            e, layer = _decide_one(n, b, b.hw, cfg, rule)
            entries[n] = _finalize(e, b, layer, cfg, b.hw)
            if layer is not None and entries[n].status == "factorize":
                built[n] = layer
    else:
        fixed = {n: entries[n] for n in chosen if n in entries}
        got, built = _plan_budget(todo, builders, cfg, sensitivity or {}, mc, it, fixed)
        entries.update(got)
    for n in chosen:
        e = entries[n]
        m = convs[n]
        e.aliases = list(aliases[n])
        e.params_before = cost.unit_params(m)
        u = units.get(id(m))
        if u is not None:
            e.macs_before, e.calls = u.macs, u.calls
        if n in builders:
            e.kind = builders[n].kind
        if e.status == "factorize" and n in built:
            _verify_entry(e, builders[n], built[n], cap, m)
            if e.status != "factorize":
                built.pop(n)
        if sensitivity and n in sensitivity:
            e.sensitivity = float(sensitivity[n])
    _warn_poor([entries[n] for n in chosen], rule.kind)
    p = Plan(
        config=cfg.to_dict(),
        layers=[entries[n] for n in chosen],
        input_shape=shape,
        model_params=mc.total_params,
        model_macs=mc.total_macs,
    )
    p._built = built
    p._reference = (args, cap.model_output)
    return p


def _plan_budget(
    chosen: list[str],
    builders: dict[str, _Builder],
    cfg: CompressConfig,
    sensitivity: dict[str, float],
    mc: cost.ModelCost,
    it: Any,
    fixed: dict[str, LayerPlan],
) -> tuple[dict[str, LayerPlan], dict[str, nn.Module]]:
    """Split a model-wide budget over the ``chosen`` layers; ``fixed`` are selected layers that stay
    dense whatever the budget (their cost counts against it)."""
    sizes = {n: builders[n].hw for n in chosen}
    kind = cfg.budget_kind
    method = "tucker2" if cfg.method == "auto" else cfg.method
    ladders: list[LayerLadder] = []
    entries: dict[str, LayerPlan] = {}
    for n in it:
        b = builders[n]
        cls = b.cls(method)
        try:
            mx = tuple(cls.max_ranks(b.geom))
        except TensorcutError as e:
            entries[n] = _entry(n, b, sizes[n], method, "dense", str(e))
            continue
        cands, seen = [], set()
        for s in BUDGET_SCALES:
            r = scaled_ranks(mx, s)
            if cfg.align > 1:
                r = align_ranks(r, mx, cfg.align)
            p = b.params(method, r)
            if r in seen or p >= b.geom.dense_params():
                continue
            seen.add(r)
            cands.append(Candidate(r, p, b.macs(method, r)))

        def evaluate(i: int, b: _Builder = b, cands: list[Candidate] = cands, n: str = n) -> float:
            try:
                layer = b.build(method, cands[i].ranks, fast=True)
            except (TensorcutError, ConvergenceError):
                return math.inf
            return _rel_error(b.conv.weight, layer)

        if not cands:
            entries[n] = _entry(
                n,
                b,
                sizes[n],
                method,
                "dense",
                f"no {method} factorization is smaller than the dense layer",
            )
            continue
        ladders.append(
            LayerLadder(
                n,
                b.geom.dense_params(),
                b.dense_macs(),
                cands,
                weight=float(sensitivity.get(n, 1.0)) * b.geom.dense_params(),
                evaluate=evaluate,
            )
        )

    def cost_of(n: str) -> int:
        g = builders[n].geom
        return g.dense_params() if kind == "params" else builders[n].dense_macs()

    fixed_cost = sum(e.params_before if kind == "params" else e.macs_before for e in fixed.values())
    listed = sum(cost_of(n) for n in chosen) + fixed_cost
    unladdered = sum(cost_of(n) for n in chosen if n in entries) + fixed_cost
    if cfg.budget < 1:  # type: ignore[operator]
        # a fraction of the listed conv layers' dense cost
        met = allocate_budget(ladders, cfg.budget * listed, kind, fixed_cost=unladdered)  # type: ignore[operator]
    else:
        # an absolute count for the whole model
        whole = mc.total_params if kind == "params" else mc.total_macs
        met = allocate_budget(ladders, cfg.budget, kind, fixed_cost=whole - listed + unladdered)  # type: ignore[arg-type]
    built: dict[str, nn.Module] = {}
    for l in ladders:
        b = builders[l.name]
        if l.choice < 0:
            entries[l.name] = _entry(
                l.name,
                b,
                sizes[l.name],
                method,
                "dense",
                "budget met without compressing this layer",
            )
            continue
        c = l.candidates[l.choice]
        try:
            layer = b.build(method, c.ranks)
        except (TensorcutError, ConvergenceError) as err:
            entries[l.name] = _entry(
                l.name,
                b,
                sizes[l.name],
                method,
                "dense",
                f"{method} failed at ranks {c.ranks}: {err}",
            )
            continue
        e = _entry(
            l.name,
            b,
            sizes[l.name],
            method,
            "factorize",
            "",
            layer=layer,
            note="" if met else "budget not met: smallest candidates used",
        )
        if cfg.method == "auto" and e.error is not None:
            # the allocation gave this layer an error share; keep the smallest method that meets it
            e, layer = _smallest_within(l.name, b, sizes[l.name], e, layer)
        entries[l.name] = _finalize(e, b, layer, cfg, sizes[l.name])
        if entries[l.name].status == "factorize":
            built[l.name] = layer
    return entries, built


def _layer_for(e: LayerPlan, module: nn.Module, plan: Plan, allow_custom: bool) -> nn.Module:
    """The factorized layer for plan entry ``e``: the one ``plan`` built and checked, or rebuilt
    from the module's effective kernel at the recorded ranks."""
    layer = plan._built.get(e.name)
    if layer is not None and list(layer.ranks) == e.ranks:  # type: ignore[arg-type]
        layer = copy.deepcopy(layer)  # a plan may be applied to several models; never share modules
    else:
        r = resolve(module, allow_custom_forward=allow_custom)
        if isinstance(r, str):
            raise TensorcutError(f"plan layer {e.name!r} cannot be factorized in this model: {r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = LAYER_REGISTRY[e.method].from_conv(r.conv, ranks=tuple(e.ranks), **e.options)
    w = module.weight  # type: ignore[union-attr]
    layer = layer.to(device=w.device, dtype=w.dtype)
    if not w.requires_grad:  # a frozen conv stays frozen
        layer.requires_grad_(False)
    return layer


def apply(model: nn.Module, plan: Plan) -> nn.Module:
    """Swap the planned convolutions for factorized layers, in place.

    Args:
        model: the model the plan was made for (or one of the same architecture).
        plan: a :class:`Plan` from :func:`plan` (or :meth:`Plan.load`).

    Returns:
        ``model``, with every ``factorize`` entry replaced under all its names (shared modules
        stay shared).

    Raises:
        TensorcutError: a planned layer is missing, not a Conv2d (already compressed?), has another
            geometry, or names an unknown method — checked for every layer before anything changes.

    Example:
        >>> p = plan(model, ratio=0.5, input_shape=(3, 32, 32))
        >>> apply(model, p)
    """
    allow_custom = (
        bool(plan.config.get("allow_custom_forward", False))
        if isinstance(plan.config, dict)
        else False
    )
    todo = []
    for e in plan.layers:
        if e.status != "factorize":
            continue
        try:
            conv = model.get_submodule(e.name)
        except AttributeError:
            raise TensorcutError(
                f"plan names layer {e.name!r}, which this model does not have; make the plan for this model"
            ) from None
        if not isinstance(conv, nn.Conv2d):
            raise TensorcutError(
                f"plan layer {e.name!r} is a {type(conv).__name__} in this model, not a Conv2d (already compressed?)"
            )
        r = resolve(conv, allow_custom_forward=allow_custom)
        geom = (
            ConvGeometry.from_conv(r.conv)
            if not isinstance(r, str)
            else ConvGeometry.from_conv(conv)
        )
        if geom.to_dict() != e.geometry:
            raise TensorcutError(
                f"plan does not match model at {e.name!r}: planned geometry {e.geometry} differs from the layer's"
            )
        if e.method not in LAYER_REGISTRY:
            raise TensorcutError(
                f"plan layer {e.name!r} uses unknown method {e.method!r}; known: {', '.join(_methods())}"
            )
        for a in e.aliases:
            try:
                other = model.get_submodule(a)
            except AttributeError:
                raise TensorcutError(
                    f"plan names layer {a!r} (a second name of {e.name!r}), which this model does not have"
                ) from None
            if other is not conv:
                raise TensorcutError(
                    f"plan says {a!r} and {e.name!r} are one shared module, but in this model they are not"
                )
        layer = _layer_for(e, conv, plan, allow_custom)
        got = sum(q.numel() for q in layer.parameters())
        if got != e.params_after:
            raise TensorcutError(
                f"plan layer {e.name!r} records {e.params_after:,} parameters at ranks {tuple(e.ranks)} but a "
                f"{e.method} layer with those ranks holds {got:,} (ranks beyond what the kernel admits "
                "are clamped); the plan was edited or made for another model"
            )
        todo.append((e, layer))
    for e, layer in todo:
        for n in (e.name, *e.aliases):
            model.set_submodule(n, layer)
    return model


def compress(
    model: nn.Module,
    config: CompressConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    from_scratch: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, Plan]:
    """``plan`` then ``apply``, then one check of the whole compressed model.

    Args:
        model: the model to compress (modified in place).
        config: a :class:`CompressConfig`, or its fields as keyword arguments.
        filter_fn: selects layers, as in :func:`plan`.
        from_scratch: re-initialise the factorized layers randomly (the thesis's "tensorize, then
            train from scratch"); otherwise the factors come from the pretrained kernels.
        **kwargs: ``input_shape``, ``calibration``, ``sensitivity``, ``layers``, ``progress``
            (see :func:`plan`) and :class:`CompressConfig` fields.

    Returns:
        ``(model, plan)``; ``plan.model_output_error`` holds the compressed model's
        relative output error on the calibration batch (before any re-initialisation).

    Raises:
        TensorcutError: as :func:`plan` and :func:`apply`; and when the compressed model's forward
            fails, after restoring every original module (the model is left as it was).

    Example:
        >>> model, p = compress(model, method="tucker2", ratio=0.3, input_shape=(3, 32, 32))
    """
    plan_kw = {
        k: kwargs.pop(k)
        for k in ("input_shape", "calibration", "sensitivity", "layers", "progress")
        if k in kwargs
    }
    p = plan(model, config, filter_fn, **plan_kw, **kwargs)
    originals = {
        n: model.get_submodule(n)
        for e in p.layers
        if e.status == "factorize"
        for n in (e.name, *e.aliases)
    }
    assert p._reference is not None  # set by plan
    args, ref = p._reference
    was_training = model.training
    model.eval()
    try:
        apply(model, p)
        with torch.no_grad():
            out = model(*args)
    except (
        Exception
    ) as e:  # the user's forward on the swapped model: restore, then report in one line
        for n, m in originals.items():
            model.set_submodule(n, m)
        model.train(was_training)
        if isinstance(e, TensorcutError):
            raise
        first = (str(e).splitlines() or [""])[0][:200]
        raise TensorcutError(
            f"the compressed model's forward failed ({type(e).__name__}: {first}); the original modules "
            "were restored. Please report this model; compress fewer layers (layers=... or filter_fn) meanwhile"
        ) from None
    model.train(was_training)
    if isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor) and ref.shape == out.shape:
        p.model_output_error = relative_difference(out, ref)
    if from_scratch:
        for m in model.modules():
            if isinstance(m, FactorizedConv2d):
                m.reset_parameters()
    return model, p


def decompress(model: nn.Module) -> nn.Module:
    """The inverse of :func:`apply`: every factorized convolution back to a dense one, in place.

    Args:
        model: a model holding factorized layers (any registered method).

    Returns:
        ``model`` with each factorized layer replaced by the ``nn.Conv2d`` (a :class:`SameConv2d`
        for TF-same padding) that computes its reconstructed kernel, under all its names.

    Example:
        >>> dense = decompress(compressed_model)
    """
    done: dict[int, nn.Module] = {}
    for n, m in list(model.named_modules(remove_duplicate=False)):
        if isinstance(m, FactorizedConv2d):
            if id(m) not in done:
                conv = m.to_conv()
                conv.requires_grad_(any(p.requires_grad for p in m.parameters()))
                done[id(m)] = conv
            model.set_submodule(n, done[id(m)])
    return model
