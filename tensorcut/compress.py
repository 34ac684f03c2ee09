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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

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

__all__ = ["CompressConfig", "LayerPlan", "Plan", "apply", "compress", "default_filter", "plan", "conv_input_sizes"]

AUTO_METHODS = ("cp", "tucker2", "tt", "tr")
BUDGET_SCALES = (1.0, 0.75, 0.55, 0.4, 0.3, 0.22, 0.16, 0.12, 0.08, 0.05, 0.03, 0.015)

FilterFn = Callable[[str, nn.Module], bool]

#: Cheaper decomposition settings for scoring budget candidates (the applied layers use the full ones).
FAST_OPTIONS: dict[str, dict[str, Any]] = {"tucker2": {"hooi": False}, "tucker": {"hooi": False}, "cp": {"n_iter_max": 25}}


def _methods() -> list[str]:
    import tensorcut.layers  # noqa: F401  (registers the layer classes)

    return sorted(LAYER_REGISTRY)


def default_filter(name: str, module: nn.Module) -> bool:
    """Every Conv2d except stems (<= 3 input channels), which hold few parameters and are sensitive."""
    return isinstance(module, nn.Conv2d) and module.in_channels > 3


@dataclass
class CompressConfig:
    """What to factorize and how. Exactly one rank rule (``rank``/``ratio``/``eps``/``energy``) or a ``budget``.

    ``budget`` below 1 is a fraction of the eligible layers' dense cost, otherwise an
    absolute count of ``budget_kind`` ('params' or 'macs'). ``latency=True`` keeps a layer
    dense when its factorized form is not faster on the current device. ``align`` > 1 rounds
    every rank to a multiple of ``align`` (8 or 16 suit SIMD units): down for the size rules
    (rank, ratio, vbmf, budget), up for the error rules (eps, energy), within each mode's maximum.
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

    def __post_init__(self) -> None:
        methods = sorted(_methods() + ["auto"])
        if self.method not in methods:
            raise TensorcutError(f"unknown method {self.method!r}; choose one of: {', '.join(methods)}")
        if isinstance(self.rank, list):
            self.rank = tuple(self.rank)
        self.rule  # validates the rank options
        if self.budget is not None:
            if self.rule.kind != "none":
                raise TensorcutError(f"contradictory rank options: budget and {self.rule.kind}; give one of them")
            if not self.budget > 0:
                raise TensorcutError(f"budget must be > 0, got {self.budget}")
            if self.budget_kind not in ("params", "macs"):
                raise TensorcutError(f"budget kind must be 'params' or 'macs', got {self.budget_kind!r}")
        elif self.rule.kind == "none":
            raise TensorcutError("no rank rule: give one of rank, ratio, eps, energy, rank='vbmf', or a budget")
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise TensorcutError(f"align must be a positive integer (e.g. 8 or 16), got {self.align!r}")
        if self.rule.kind == "vbmf" and self.method != "tucker2":
            raise TensorcutError(f"rank='vbmf' applies to Tucker-2 only; use method='tucker2' (got {self.method!r})")

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
    options: dict[str, Any] = field(default_factory=dict)  # rebuild options beyond the ranks (TR: the RSDTR shift)

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
    _built: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)

    # ---------------------------------------------------------------- totals
    def totals(self) -> dict[str, Any]:
        """Conv-layer and whole-model parameter / MAC totals before and after."""
        pb = sum(l.params_before for l in self.layers)
        pa = sum(l.params_after if l.status == "factorize" else l.params_before for l in self.layers)
        mb = sum(l.macs_before for l in self.layers)
        ma = sum(l.macs_after if l.status == "factorize" else l.macs_before for l in self.layers)
        return {
            "conv_params_before": pb, "conv_params_after": pa, "conv_ratio": pb / pa if pa else 1.0,
            "conv_macs_before": mb, "conv_macs_after": ma, "conv_mac_ratio": mb / ma if ma else 1.0,
            "model_params_before": self.model_params, "model_params_after": self.model_params - pb + pa,
            "model_ratio": self.model_params / (self.model_params - pb + pa),
            "model_macs_before": self.model_macs, "model_macs_after": self.model_macs - mb + ma,
            "model_mac_ratio": self.model_macs / (self.model_macs - mb + ma) if (self.model_macs - mb + ma) else 1.0,
            "factorized_layers": sum(l.status == "factorize" for l in self.layers),
            "dense_layers": sum(l.status != "factorize" for l in self.layers),
        }

    def table(self) -> str:
        """Human-readable per-layer table (listed conv layers only) with totals."""
        head = ("layer", "method", "ranks", "params", "->", "PCR", "MACs ->", "FCR", "rel.err", "decision")
        rows = []
        for l in self.layers:
            fact = l.status == "factorize"
            rows.append((l.name, l.method if fact else "-", "x".join(map(str, l.ranks)) if fact else "-",
                         f"{l.params_before:,}", f"{l.params_after:,}" if fact else "=", f"{l.ratio:.2f}" if fact else "1.00",
                         f"{l.macs_after:,}" if fact else "=", f"{l.mac_ratio:.2f}" if fact else "1.00",
                         f"{l.error:.4f}" if (fact and l.error is not None) else "-",
                         "factorize" + (f" ({l.note})" if l.note else "") if fact else f"dense: {l.reason}"))
        t = self.totals()
        rows.append(("conv layers", "", "", f"{t['conv_params_before']:,}", f"{t['conv_params_after']:,}",
                     f"{t['conv_ratio']:.2f}", f"{t['conv_macs_after']:,}", f"{t['conv_mac_ratio']:.2f}", "", ""))
        rows.append(("whole model", "", "", f"{t['model_params_before']:,}", f"{t['model_params_after']:,}",
                     f"{t['model_ratio']:.2f}", f"{t['model_macs_after']:,}", f"{t['model_mac_ratio']:.2f}", "", ""))
        w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in [head, *rows]]
        lines.insert(1, "  ".join("-" * x for x in w))
        lines.append("PCR = dense / stored parameters; FCR = dense / factorized MACs; rel.err = ||W - W~||_F / ||W||_F of the kernel; MACs per image at input "
                     + "x".join(map(str, self.input_shape)) + ".")
        return "\n".join(lines)

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"format": "tensorcut-plan", "version": 1, "config": self.config, "input_shape": self.input_shape,
                "model_params": self.model_params, "model_macs": self.model_macs,
                "layers": [asdict(l) for l in self.layers], "totals": self.totals()}

    def to_json(self) -> str:
        """Pretty JSON."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`; a malformed plan raises TensorcutError."""
        if not isinstance(d, dict) or d.get("format") != "tensorcut-plan":
            raise TensorcutError("not a tensorcut plan (missing format='tensorcut-plan')")
        try:
            layers = [LayerPlan(**l) for l in d["layers"]]
            return cls(config=d["config"], layers=layers, input_shape=list(d["input_shape"]),
                       model_params=int(d["model_params"]), model_macs=int(d["model_macs"]))
        except (KeyError, TypeError) as e:
            raise TensorcutError(f"malformed plan: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write the plan atomically as JSON."""
        from tensorcut.io import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan written by :meth:`save`."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise TensorcutError(f"cannot read plan {path}: {e}") from None


# ----------------------------------------------------------------------------- helpers


def conv_input_sizes(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, int]]:
    """Spatial size of the input of every Conv2d, traced with one zero image."""
    from tensorcut.summary import probe

    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=name: sizes.__setitem__(n, tuple(inp[0].shape[-2:])))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    probe(model, input_shape, hooks)
    return sizes


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

    def __init__(self, name: str, conv: nn.Conv2d, cfg: CompressConfig, hw: tuple[int, int] | None = None) -> None:
        self.name, self.conv, self.cfg, self.hw = name, conv, cfg, hw
        self.geom = ConvGeometry.from_conv(conv)
        self.cache: dict[tuple[str, tuple[int, ...]], nn.Module] = {}

    def cls(self, method: str) -> type[FactorizedConv2d]:
        return LAYER_REGISTRY[method]

    def build(self, method: str, ranks: tuple[int, ...] | None = None, *, fast: bool = False, **rule: Any) -> nn.Module:
        """The factorized layer; ``fast`` trades a little accuracy for speed (HOSVD without HOOI,
        fewer ALS sweeps) — used only to rank budget candidates, never for the applied layer."""
        align = self.cfg.align
        if align > 1 and ranks is not None:
            ranks = align_ranks(ranks, self.cls(method).max_ranks(self.geom), align)
        key = (method, ranks, fast) if ranks is not None else None
        if key is not None and key in self.cache:
            return self.cache[key]
        opts = dict(self.cfg.options.get(method, {}))
        if method == "tr" and opts.get("objective") == "macs" and "input_size" not in opts and self.hw is not None:
            opts["input_size"] = tuple(self.hw)  # each layer's own input size
        if ranks is not None and method == "tr":
            opts = {k: v for k, v in opts.items() if k == "shift"}  # explicit ranks fix the ring; search options do not apply
        if fast:
            opts.update(FAST_OPTIONS.get(method, {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = self.cls(method).from_conv(self.conv, ranks=ranks, **rule, **opts)
        if align > 1 and ranks is None:  # an error rule chose the ranks: round up, so the bound still holds
            up = align_ranks(layer.ranks, self.cls(method).max_ranks(self.geom), align, up=True)
            if up != tuple(layer.ranks):
                return self.build(method, up, fast=fast)
        self.cache[(method, tuple(layer.ranks), fast)] = layer
        return layer


def _ranks_for(b: _Builder, method: str, rule: RankRule) -> tuple[tuple[int, ...] | None, str, dict[str, Any]]:
    """Ranks for ``method`` under ``rule``: (ranks or None to let from_conv decide, clamp note, from_conv kwargs)."""
    cls = b.cls(method)
    mx = tuple(cls.max_ranks(b.geom))
    if rule.kind == "rank":
        req = (rule.rank,) * len(mx) if isinstance(rule.rank, int) else tuple(rule.rank)  # type: ignore[arg-type]
        if len(req) != len(mx):
            raise TensorcutError(f"{method} takes {len(mx)} ranks {'(' + ', '.join('r' + str(i) for i in range(len(mx))) + ')'}, got {len(req)}: {req}")
        r, note = clamp_ranks(req, mx)
        return r, note, {}
    if rule.kind == "vbmf":
        r, note = clamp_ranks(vbmf_tucker2_ranks(b.conv.weight), mx)
        return r, note, {}
    if rule.kind == "ratio":
        target = rule.ratio * b.geom.dense_params()  # type: ignore[operator]
        r = ranks_for_ratio(mx, lambda r: cls.predicted_params(b.geom, r), target, b.cfg.align)
        p = cls.predicted_params(b.geom, r)
        note = f"align={b.cfg.align} needs ranks >= {b.cfg.align}: {p:,} params > target {target:,.0f}" if (
            b.cfg.align > 1 and p > target) else ""
        return r, note, {}
    if rule.kind == "eps":
        return None, "", {"eps": rule.eps}
    if rule.kind == "energy":
        return None, "", {"energy": rule.energy}
    raise TensorcutError(f"rank rule {rule.kind!r} cannot pick ranks for one layer")


def _entry(name: str, b: _Builder, hw: tuple[int, int], method: str, status: str, reason: str,
           ranks: Sequence[int] = (), layer: nn.Module | None = None, note: str = "") -> LayerPlan:
    g = b.geom
    pa = ma = 0
    err = None
    options: dict[str, Any] = {}
    if layer is not None:
        res = getattr(layer, "tr_result", None)
        if res is not None:
            options = {"shift": int(res.shift)}
        cls = b.cls(method)
        pa = int(cls.predicted_params(g, tuple(layer.ranks)))
        ma = int(cls.predicted_macs(g, tuple(layer.ranks), hw))
        err = _rel_error(b.conv.weight, layer)
        ranks = tuple(layer.ranks)
    return LayerPlan(name=name, method=method, status=status, reason=reason, ranks=[int(r) for r in ranks],
                     params_before=g.dense_params(), params_after=pa, macs_before=g.dense_macs(hw), macs_after=ma,
                     error=err, geometry=g.to_dict(), input_hw=list(hw), note=note, options=options)


def _decide_one(name: str, b: _Builder, hw: tuple[int, int], cfg: CompressConfig, rule: RankRule) -> tuple[LayerPlan, nn.Module | None]:
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
        return _entry(name, b, hw, cfg.method, "dense", "; ".join(reasons) or "no method applies"), None
    return best


def _cp_fallback(name: str, b: _Builder, hw: tuple[int, int], rule: RankRule,
                 err: Exception) -> tuple[LayerPlan, nn.Module] | str:
    """Tucker-2 in place of a CP decomposition that failed, at the same parameter share for explicit ranks."""
    try:
        if rule.kind == "rank":
            cp = b.cls("cp")
            r = (rule.rank,) if isinstance(rule.rank, int) else tuple(rule.rank)  # type: ignore[arg-type]
            rule = RankRule(ratio=min(0.99, cp.predicted_params(b.geom, r) / b.geom.dense_params()))
        ranks, _, kw = _ranks_for(b, "tucker2", rule)
        layer = b.build("tucker2", ranks, **kw)
    except (TensorcutError, ConvergenceError) as e2:
        return f"cp: did not converge ({err}); Tucker-2 fallback failed ({e2})"
    return _entry(name, b, hw, "tucker2", "factorize", "", layer=layer,
                  note=f"CP did not converge ({err}); fell back to Tucker-2"), layer


def _smallest_within(name: str, b: _Builder, hw: tuple[int, int], entry: LayerPlan,
                     layer: nn.Module) -> tuple[LayerPlan, nn.Module]:
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


def _finalize(entry: LayerPlan, b: _Builder, layer: nn.Module | None, cfg: CompressConfig, hw: tuple[int, int]) -> LayerPlan:
    """Size and latency guards: a factorization that is not smaller (or not faster) stays dense."""
    if entry.status != "factorize" or layer is None:
        return entry
    if entry.params_after >= entry.params_before:
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


def plan(
    model: nn.Module,
    config: CompressConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    sensitivity: dict[str, float] | None = None,
    layers: Sequence[str] | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> Plan:
    """Decide, per convolution, the method and ranks (the model is not modified).

    ``config`` or keyword arguments of :class:`CompressConfig`. ``filter_fn(name, module)``
    selects layers (default: :func:`default_filter`); ``layers`` names them explicitly.
    ``input_shape`` (C, H, W) is needed for MACs (default: first conv's channels at 32x32).
    ``sensitivity`` maps layer names to weights (e.g. accuracy drop per norm loss from the
    truncation study): under a budget, sensitive layers are compressed more mildly.
    """
    cfg = config or CompressConfig(**kwargs)
    if config is not None and kwargs:
        raise TensorcutError("give either a CompressConfig or keyword options, not both")
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if not convs:
        raise TensorcutError("the model has no Conv2d layers to compress")
    if layers is not None:
        unknown = [n for n in layers if n not in convs]
        if unknown:
            raise TensorcutError(f"unknown layer {unknown[0]!r}; conv layers are: {', '.join(convs)}")
        chosen = list(layers)
    else:
        f = filter_fn or default_filter
        chosen = [n for n, m in convs.items() if f(n, m)]
    if not chosen:
        raise TensorcutError("the filter selected no conv layer; nothing to compress (the default skips stems with <= 3 input channels)")
    if input_shape is None:
        first = next(iter(convs.values()))
        input_shape = (first.in_channels, 32, 32)
    sizes = conv_input_sizes(model, input_shape)
    from tensorcut.summary import summarize

    summ = summarize(model, tuple(input_shape))
    builders = {n: _Builder(n, convs[n], cfg, sizes[n]) for n in chosen}
    entries: dict[str, LayerPlan] = {}
    built: dict[str, nn.Module] = {}
    rule = cfg.rule
    it = tqdm(chosen, desc="plan", leave=False, disable=None if progress else True)
    if cfg.budget is None:
        for n in it:
            e, layer = _decide_one(n, builders[n], sizes[n], cfg, rule)
            entries[n] = _finalize(e, builders[n], layer, cfg, sizes[n])
            if layer is not None and entries[n].status == "factorize":
                built[n] = layer
    else:
        entries, built = _plan_budget(chosen, builders, sizes, cfg, sensitivity or {}, summ, it)
    for n, e in entries.items():
        if sensitivity and n in sensitivity:
            e.sensitivity = float(sensitivity[n])
    p = Plan(config=cfg.to_dict(), layers=[entries[n] for n in chosen], input_shape=list(input_shape),
             model_params=summ.total_params, model_macs=summ.total_macs)
    p._built = built
    return p


def _plan_budget(chosen: list[str], builders: dict[str, _Builder], sizes: dict[str, tuple[int, int]],
                 cfg: CompressConfig, sensitivity: dict[str, float], summ: Any, it: Any) -> tuple[dict[str, LayerPlan], dict[str, nn.Module]]:
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
            p = int(cls.predicted_params(b.geom, r))
            if r in seen or p >= b.geom.dense_params():
                continue
            seen.add(r)
            cands.append(Candidate(r, p, int(cls.predicted_macs(b.geom, r, sizes[n]))))

        def evaluate(i: int, b: _Builder = b, cands: list[Candidate] = cands, n: str = n) -> float:
            try:
                layer = b.build(method, cands[i].ranks, fast=True)
            except (TensorcutError, ConvergenceError):
                return math.inf
            return _rel_error(b.conv.weight, layer)

        if not cands:
            entries[n] = _entry(n, b, sizes[n], method, "dense", f"no {method} factorization is smaller than the dense layer")
            continue
        ladders.append(LayerLadder(n, b.geom.dense_params(), b.geom.dense_macs(sizes[n]), cands,
                                   weight=float(sensitivity.get(n, 1.0)) * b.geom.dense_params(), evaluate=evaluate))
    def cost(n: str) -> int:
        g = builders[n].geom
        return g.dense_params() if kind == "params" else g.dense_macs(sizes[n])

    listed = sum(cost(n) for n in chosen)
    unladdered = sum(cost(n) for n in chosen if n in entries)
    if cfg.budget < 1:  # type: ignore[operator]
        # a fraction of the listed conv layers' dense cost
        met = allocate_budget(ladders, cfg.budget * listed, kind, fixed_cost=unladdered)  # type: ignore[operator]
    else:
        # an absolute count for the whole model
        whole = summ.total_params if kind == "params" else summ.total_macs
        met = allocate_budget(ladders, cfg.budget, kind, fixed_cost=whole - listed + unladdered)  # type: ignore[arg-type]
    built: dict[str, nn.Module] = {}
    for l in ladders:
        b = builders[l.name]
        if l.choice < 0:
            entries[l.name] = _entry(l.name, b, sizes[l.name], method, "dense", "budget met without compressing this layer")
            continue
        c = l.candidates[l.choice]
        try:
            layer = b.build(method, c.ranks)
        except (TensorcutError, ConvergenceError) as err:
            entries[l.name] = _entry(l.name, b, sizes[l.name], method, "dense", f"{method} failed at ranks {c.ranks}: {err}")
            continue
        e = _entry(l.name, b, sizes[l.name], method, "factorize", "", layer=layer,
                   note="" if met else "budget not met: smallest candidates used")
        if cfg.method == "auto" and e.error is not None:
            # the allocation gave this layer an error share; keep the smallest method that meets it
            e, layer = _smallest_within(l.name, b, sizes[l.name], e, layer)
        entries[l.name] = _finalize(e, b, layer, cfg, sizes[l.name])
        if entries[l.name].status == "factorize":
            built[l.name] = layer
    return entries, built


def apply(model: nn.Module, plan: Plan) -> nn.Module:
    """Swap the planned convolutions for factorized layers (in place); returns the model.

    Each layer's geometry must equal the plan's record, or the call fails before
    changing anything.
    """
    todo = []
    for e in plan.layers:
        if e.status != "factorize":
            continue
        try:
            conv = model.get_submodule(e.name)
        except AttributeError:
            raise TensorcutError(f"plan names layer {e.name!r}, which this model does not have; make the plan for this model") from None
        if not isinstance(conv, nn.Conv2d):
            raise TensorcutError(f"plan layer {e.name!r} is a {type(conv).__name__} in this model, not a Conv2d (already compressed?)")
        if ConvGeometry.from_conv(conv).to_dict() != e.geometry:
            raise TensorcutError(f"plan does not match model at {e.name!r}: planned geometry {e.geometry} differs from the layer's")
        if e.method not in LAYER_REGISTRY:
            raise TensorcutError(f"plan layer {e.name!r} uses unknown method {e.method!r}; known: {', '.join(_methods())}")
        todo.append((e, conv))
    for e, conv in todo:
        layer = plan._built.get(e.name)
        if layer is not None and list(layer.ranks) == e.ranks:
            layer = copy.deepcopy(layer)  # a plan may be applied to several models; never share modules
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer = LAYER_REGISTRY[e.method].from_conv(conv, ranks=tuple(e.ranks), **e.options)
        layer = layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        model.set_submodule(e.name, layer)
    return model


def compress(model: nn.Module, config: CompressConfig | None = None, filter_fn: FilterFn | None = None,
             *, from_scratch: bool = False, **kwargs: Any) -> tuple[nn.Module, Plan]:
    """``plan`` then ``apply``; returns the (modified) model and the plan.

    The thesis's three strategies: ``from_scratch=True`` re-initialises the factorized layers
    randomly (tensorize, then train from scratch); otherwise the factors come from the
    pretrained kernels (use as is, or fine-tune with :func:`tensorcut.train.fit`).
    """
    plan_kw = {k: kwargs.pop(k) for k in ("input_shape", "sensitivity", "layers", "progress") if k in kwargs}
    p = plan(model, config, filter_fn, **plan_kw, **kwargs)
    apply(model, p)
    if from_scratch:
        for m in model.modules():
            if isinstance(m, FactorizedConv2d):
                m.reset_parameters()
    return model, p
