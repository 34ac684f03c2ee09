"""CompressConfig: what to factorize and how — the one rank grammar, validated once.

A config names a method (a registered one, or ``"auto"``), exactly one rank rule
(:class:`~tensorcut.compression.rank.RankRule`: ``rank``, ``ratio``, ``eps``, ``energy``,
``rank="vbmf"``, ``rank="full"``), a model-wide ``budget`` or a ``target_speedup``, and the
methods' typed options.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from tensorcut.compression.rank import RankRule
from tensorcut.errors import TensorcutError
from tensorcut.layers import MethodOptions, get_method, list_methods

__all__ = ["ALLOCATIONS", "DEFAULT_METHOD", "CompressConfig", "FilterFn", "default_filter"]

FilterFn = Callable[[str, nn.Module], bool]

#: the method a config uses when none is named, and the ladder method of ``auto`` budgets
DEFAULT_METHOD = "tucker2"
#: how a budget is split over the layers (see :class:`CompressConfig`)
ALLOCATIONS = ("ladder", "measured")


def _parse_options(options: Any) -> dict[str, MethodOptions]:
    """``{method: dict | Options}`` as ``{method: Options}``, every name and field checked."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TensorcutError(
            f"options must be a dict {{method: {{option: value}}}}, got {type(options).__name__}"
        )
    out: dict[str, MethodOptions] = {}
    for method, value in options.items():
        cls = get_method(method)
        try:
            out[method] = cls.Options.parse(method, value)
        except TypeError as e:
            raise TensorcutError(f"options for {method}: {e}") from None
    return out


def default_filter(name: str, module: nn.Module) -> bool:
    """Every Conv2d except stems (<= 3 input channels), which hold few parameters and are sensitive.

    Depthwise convolutions and modules tensorcut cannot reproduce are listed in the plan as dense
    with their reason rather than filtered out here."""
    return isinstance(module, nn.Conv2d) and module.in_channels > 3


@dataclass
class CompressConfig:
    """What to factorize and how. Exactly one rank rule (``rank``/``ratio``/``eps``/``energy``), a
    ``budget`` or a ``target_speedup``.

    ``budget`` below 1 is a fraction of the eligible layers' dense cost, otherwise an
    absolute count of ``budget_kind`` ('params' or 'macs'). ``latency=True`` keeps a layer
    dense when its factorized form is not faster on the current device. ``target_speedup`` (a
    number > 1, e.g. 1.5) plans for speed instead of size: each candidate layer is timed dense and
    factorized at a few ranks on this device and thread count, ranks are allocated to reach
    ``dense latency / target_speedup`` with the least kernel error, layers whose factorized form
    is not faster stay dense (reason ``not faster``), and the whole compressed model is timed
    against dense: when it is not measurably faster the plan keeps every layer dense (see
    :func:`tensorcut.compression.speed.plan_for_speedup`; ranks are multiples of ``align``, 8 when
    ``align``
    is 1). ``align`` > 1 rounds
    every rank to a multiple of ``align`` (8 or 16 suit SIMD units): down for the size rules
    (rank, ratio, vbmf, budget), up for the error rules (eps, energy), within each mode's maximum.
    ``rank='full'`` takes each layer's maximal ranks (an exact factorization for Tucker-2, Tucker
    and TT, applied even where it is larger than the dense layer: a verification tool).
    ``allow_custom_forward=True`` reads a Conv2d subclass with an unknown ``forward`` as a plain
    convolution (each swap is still verified on real inputs; by default such modules stay dense).
    ``options`` holds each method's typed options, ``{method: {field: value}}`` or
    ``{method: Layer.Options(...)}`` (e.g. ``{"cp": {"n_iter_max": 50}}``); ``fallback`` lets a
    method that does not converge fall back to its declared ``fallback`` method (CP -> Tucker-2).
    ``allocation`` says how a ``budget`` is split: ``"ladder"`` (default) by each layer's rank
    ladder and relative kernel error (:mod:`tensorcut.compression.budget`), ``"measured"`` by
    accuracy costs measured per layer at several ranks on calibration data
    (:func:`tensorcut.compression.measured.measure_layer_drops`, passed to ``plan`` as ``drops=``):
    each layer stays dense or takes the measured option (method, ranks) that, over all layers,
    gives the least summed loss increase within the budget (an exact multiple-choice knapsack).

    Args:
        method: a name from :func:`tensorcut.list_methods`, or ``"auto"``.
        rank, ratio, eps, energy, budget, target_speedup: the rank rule (exactly one), see above.
        allocation: how a budget is split, ``"ladder"`` or ``"measured"`` (needs ``budget``).

    Raises:
        TensorcutError: an unknown method or option, no rule or two rules, a value out of range.

    Example:
        >>> import tensorcut as tc
        >>> cfg = tc.CompressConfig(method="cp", ratio=0.3, options={"cp": {"n_iter_max": 50}})
        >>> cfg.method_options("cp").n_iter_max
        50
    """

    method: str = DEFAULT_METHOD
    rank: int | tuple[int, ...] | str | None = None
    ratio: float | None = None
    eps: float | None = None
    energy: float | None = None
    budget: float | None = None
    budget_kind: str = "params"
    latency: bool = False
    target_speedup: float | None = None
    align: int = 1
    fallback: bool = True  # a method that does not converge falls back to its `fallback` method
    options: dict[str, Any] = field(default_factory=dict)
    allow_custom_forward: bool = False
    allocation: str = "ladder"

    def __post_init__(self) -> None:
        methods = list_methods() + ["auto"]
        if self.method not in methods:
            raise TensorcutError(
                f"unknown method {self.method!r}; choose one of: {', '.join(sorted(methods))}"
            )
        self.options = _parse_options(self.options)
        unused = sorted(m for m in self.options if self.method not in ("auto", m))
        if unused:
            raise TensorcutError(
                f"options for {', '.join(unused)} given but method is {self.method!r}; "
                f"drop them or use method={unused[0]!r}"
            )
        if isinstance(self.rank, list):
            self.rank = tuple(self.rank)
        _ = self.rule  # validates the rank options
        if self.target_speedup is not None:
            self._check_target_speedup()
        elif self.budget is not None:
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
        if self.allocation not in ALLOCATIONS:
            raise TensorcutError(
                f"allocation must be one of {', '.join(map(repr, ALLOCATIONS))}, "
                f"got {self.allocation!r}"
            )
        if self.allocation == "measured" and self.budget is None:
            raise TensorcutError(
                "allocation='measured' splits a budget; give budget= (and budget_kind='macs' or "
                "'params') too, or drop allocation"
            )
        if not isinstance(self.allow_custom_forward, bool):
            raise TensorcutError(
                f"allow_custom_forward must be True or False, got {self.allow_custom_forward!r}"
            )
        if self.rule.kind == "vbmf" and not (
            self.method != "auto" and get_method(self.method).supports_vbmf
        ):
            able = [m for m in list_methods() if get_method(m).supports_vbmf]
            raise TensorcutError(
                f"rank='vbmf' applies to {', '.join(able)} only; use method={able[0]!r} "
                f"(got {self.method!r})"
            )

    def _check_target_speedup(self) -> None:
        """``target_speedup``: a finite number > 1, the only rule, one named method."""
        other = "budget" if self.budget is not None else self.rule.kind
        if other != "none":
            raise TensorcutError(
                f"contradictory rank options: target_speedup and {other}; give one of them"
            )
        t = self.target_speedup
        if (
            isinstance(t, bool)
            or not isinstance(t, (int, float))
            or not (t > 1 and math.isfinite(t))
        ):
            raise TensorcutError(
                f"target_speedup must be a number > 1 (e.g. 1.5 for 1.5x faster), got {t!r}"
            )
        if self.method == "auto":
            raise TensorcutError(
                "target_speedup times one method's layers; name it (e.g. method='tucker2'), "
                "not 'auto'"
            )
        self.target_speedup = float(t)

    @property
    def rule(self) -> RankRule:
        """The validated rank rule."""
        return RankRule(rank=self.rank, ratio=self.ratio, eps=self.eps, energy=self.energy)

    def method_options(self, method: str) -> MethodOptions:
        """The typed options for ``method`` (its defaults when none were given)."""
        opts = self.options.get(method)
        return opts if isinstance(opts, MethodOptions) else get_method(method).Options()

    def to_dict(self) -> dict[str, Any]:
        """JSON form (each method's options as a dict of the fields that were set)."""
        d = asdict(self)
        d["options"] = {m: o.kwargs() for m, o in self.options.items()}
        if isinstance(self.rank, tuple):
            d["rank"] = list(self.rank)
        return d
