"""Measured per-layer accuracy costs: the single-layer sweeps behind ``allocation="measured"``.

Why: a relative kernel error, or a sensitivity fitted as a straight line to small truncations,
says little about what a layer costs in accuracy at the ranks a tight budget needs (issue 16: the
truncation-study sensitivities sent a resnet20's layer3 to Tucker ranks 2x2 at 4x fewer MACs and
lost 8 points). Here each layer is compressed *alone* at every rung of its rank ladder, for each
method asked for, BatchNorm statistics are re-estimated on the calibration images, and the
calibration loss and top-1 are measured; the plan then picks, per layer, dense or one measured
option so that the summed loss increase (or top-1 drop) is least within the budget
(:func:`tensorcut.compression.knapsack.solve_mckp`, in
:func:`tensorcut.compression.budget.plan_measured`).

Measure on calibration data (a held-out validation subset), never on the test split.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tensorcut.compression.config import DEFAULT_METHOD, CompressConfig, FilterFn
from tensorcut.console import say
from tensorcut.errors import ConvergenceError, TensorcutError

if TYPE_CHECKING:
    from tensorcut.compression._builder import Builder

__all__ = [
    "MEASURE_FRACTIONS",
    "OBJECTIVES",
    "DropTable",
    "LayerDrops",
    "MeasuredOption",
    "check_measured_args",
    "ladder_ranks",
    "measure_layer_drops",
]

#: the fractions of a layer's dense parameters its measured ladder keeps, per method (the ratio
#: rule's ranks at each fraction); ten rungs from mild to severe, enough for the knapsack to meet
#: 2x-4x MAC budgets closely on a resnet20, at one calibration pass pair per rung
MEASURE_FRACTIONS = (0.75, 0.6, 0.5, 0.4, 0.32, 0.25, 0.2, 0.15, 0.1, 0.06)
#: what the allocation minimises: the summed calibration loss increase, or top-1 drop
OBJECTIVES = ("loss", "top1")


@dataclass
class MeasuredOption:
    """One measured way to compress one layer (the others dense)."""

    method: str
    ranks: list[int]
    params: int
    macs: int
    error: float  # relative kernel error ||W - W~|| / ||W||
    top1: float  # calibration top-1 with only this layer compressed
    loss: float  # calibration mean cross-entropy, same
    top1_drop: float  # baseline top-1 - top1 (points as a fraction, > 0 is worse)
    loss_increase: float  # loss - baseline loss (> 0 is worse)

    def value(self, objective: str) -> float:
        """The measured accuracy cost under ``objective`` ('loss' or 'top1')."""
        return self.loss_increase if objective == "loss" else self.top1_drop

    def cost(self, kind: str) -> int:
        """Parameters or MACs (``kind``)."""
        return self.params if kind == "params" else self.macs


@dataclass
class LayerDrops:
    """The measured options of one layer; ``skipped`` says which rungs could not be built."""

    name: str
    dense_params: int
    dense_macs: int
    options: list[MeasuredOption]
    skipped: list[str] = field(default_factory=list)

    def dense_cost(self, kind: str) -> int:
        """The dense layer's parameters or MACs (``kind``)."""
        return self.dense_params if kind == "params" else self.dense_macs


@dataclass
class DropTable:
    """Per-layer accuracy costs measured at several ranks on calibration data.

    Made by :func:`measure_layer_drops`, consumed by ``plan(..., drops=table)`` with
    ``CompressConfig(budget=..., allocation="measured")``; JSON round trip via :meth:`save` /
    :meth:`load`.

    Example:
        >>> table = measure_layer_drops(model, calib_loader)  # doctest: +SKIP
        >>> print(table.table())  # doctest: +SKIP
    """

    layers: list[LayerDrops]
    baseline_top1: float
    baseline_loss: float
    images: int
    input_shape: list[int]
    methods: list[str]
    objective: str = "loss"
    bn_recalibrated: bool = True
    seconds: float = 0.0

    def layer(self, name: str) -> LayerDrops | None:
        """The measurements of layer ``name`` (None when it was not measured)."""
        return next((ld for ld in self.layers if ld.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"format": "tensorcut-drops", "version": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DropTable:
        """Inverse of :meth:`to_dict`; a malformed table raises TensorcutError."""
        if not isinstance(d, Mapping) or d.get("format") != "tensorcut-drops":
            raise TensorcutError(
                "not a tensorcut drop table (missing format='tensorcut-drops'); make one with "
                "tensorcut.compression.measured.measure_layer_drops"
            )
        try:
            layers = [
                LayerDrops(
                    name=ld["name"],
                    dense_params=int(ld["dense_params"]),
                    dense_macs=int(ld["dense_macs"]),
                    options=[MeasuredOption(**o) for o in ld["options"]],
                    skipped=list(ld.get("skipped", [])),
                )
                for ld in d["layers"]
            ]
            return cls(
                layers=layers,
                baseline_top1=float(d["baseline_top1"]),
                baseline_loss=float(d["baseline_loss"]),
                images=int(d["images"]),
                input_shape=list(d["input_shape"]),
                methods=list(d["methods"]),
                objective=str(d.get("objective", "loss")),
                bn_recalibrated=bool(d.get("bn_recalibrated", True)),
                seconds=float(d.get("seconds", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TensorcutError(f"malformed drop table: {type(e).__name__}: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write the table atomically as JSON."""
        from tensorcut.checkpoint.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> DropTable:
        """Read a table written by :meth:`save` (JSON only; nothing is unpickled).

        Raises:
            TensorcutError: one line naming ``path``: unreadable, not JSON, or not a drop table.
        """
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TensorcutError(
                f"cannot read drop table {path}: {type(e).__name__}: {str(e)[:160]}"
            ) from None
        try:
            return cls.from_dict(doc)
        except TensorcutError as e:
            raise TensorcutError(f"{path}: {e}") from None

    def table(self) -> str:
        """One line per measured option: layer, method, ranks, cost share, loss and top-1 cost."""
        lines = [
            f"baseline on {self.images} calibration images: top-1 {self.baseline_top1:.4f}, loss "
            f"{self.baseline_loss:.4f}"
            + (" (BatchNorm re-estimated)" if self.bn_recalibrated else ""),
            f"{'layer':<24} {'method':<8} {'ranks':<12} {'MACs':>6} {'params':>6} "
            f"{'loss +':>9} {'top-1 -':>8}",
        ]
        for ld in self.layers:
            for o in ld.options:
                lines.append(
                    f"{ld.name:<24} {o.method:<8} {'x'.join(map(str, o.ranks)):<12} "
                    f"{o.macs / max(ld.dense_macs, 1):>6.0%} "
                    f"{o.params / max(ld.dense_params, 1):>6.0%} "
                    f"{o.loss_increase:>+9.4f} {100 * o.top1_drop:>+7.2f}pt"
                )
        return "\n".join(lines)


def check_measured_args(
    cfg: CompressConfig, drops: DropTable | None, sensitivity: Mapping[str, float] | None
) -> None:
    """Refuse a measured allocation without its table, a table without it, or both guides.

    Raises:
        TensorcutError: one line saying what to pass.
    """
    if cfg.allocation == "measured":
        if drops is None:
            raise TensorcutError(
                "allocation='measured' needs the measured drops: pass drops="
                "tensorcut.compression.measured.measure_layer_drops(model, calib_loader, config)"
            )
        if not isinstance(drops, DropTable):
            raise TensorcutError(
                f"drops must be a DropTable (from measure_layer_drops or DropTable.load), got "
                f"{type(drops).__name__}"
            )
        if sensitivity:
            raise TensorcutError(
                "allocation='measured' uses measured accuracy costs, not sensitivity weights; "
                "drop sensitivity"
            )
    elif drops is not None:
        raise TensorcutError(
            "drops are used by allocation='measured' only; add allocation='measured' (with a "
            "budget) to the config, or drop drops"
        )


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    return (batch[0] if isinstance(batch, (tuple, list)) else batch), None


def _score(
    model: nn.Module, loader: Iterable[Any], dev: torch.device, max_batches: int | None
) -> tuple[float, float, int]:
    """(top-1, mean cross-entropy, images) of ``model`` in eval mode over ``loader``."""
    model.eval()
    n, correct, loss = 0, 0, 0.0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _split(batch)
            assert y is not None  # checked on entry
            out = model(x.to(dev))
            y = y.to(dev)
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += int(y.numel())
    return correct / max(n, 1), loss / max(n, 1), n


def _first_batch(loader: Iterable[Any]) -> torch.Tensor:
    """The first batch's images; refuse loaders without labels or images."""
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise TensorcutError(
            "the calibration loader is empty; give a loader of (images, labels) batches from a "
            "held-out split"
        ) from None
    x, y = _split(batch)
    if y is None or not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise TensorcutError(
            "the calibration loader must yield (images, labels) batches with images of shape "
            "(N, C, H, W): the measured drops need labels"
        )
    return x


def ladder_ranks(b: Builder, method: str, fractions: Sequence[float]) -> list[tuple[int, ...]]:
    """The measured ladder of one layer: distinct ranks of ``method`` at each parameter fraction.

    Args:
        b: the layer's builder (:func:`tensorcut.compression.selection.select_layers`).
        method: a registered method.
        fractions: fractions of the dense parameters to keep (the ratio rule's ranks for each).

    Returns:
        The distinct ranks, in the order of ``fractions``, each smaller than the dense layer.

    Raises:
        TensorcutError: the method cannot factorize this layer.

    Example:
        >>> ladder_ranks(sel.builders["layer1.0.conv1"], "tucker2", (0.5, 0.25))  # doctest: +SKIP
        [(11, 11), (8, 8)]
    """
    from tensorcut.compression.rank import ranks_for_ratio

    mx = tuple(b.cls(method).max_ranks(b.geom))
    out: list[tuple[int, ...]] = []

    def params_of(r: tuple[int, ...]) -> int:
        return b.params(method, r)

    for f in fractions:
        r = ranks_for_ratio(mx, params_of, f * b.geom.dense_params(), b.cfg.align)
        if r not in out and b.params(method, r) < b.geom.dense_params():
            out.append(r)
    return out


def measure_layer_drops(
    model: nn.Module,
    loader: Iterable[Any],
    config: CompressConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    methods: Sequence[str] | None = None,
    fractions: Sequence[float] = MEASURE_FRACTIONS,
    rungs: Mapping[str, Sequence[tuple[str, Sequence[int]]]] | None = None,
    layers: Sequence[str] | None = None,
    objective: str = "loss",
    bn_recalibrate: bool = True,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> DropTable:
    """Measure each layer's accuracy cost at several ranks, one layer compressed at a time.

    For every selected convolution and every method, the layer alone is replaced by its
    factorization at each rung of its ladder (the ranks that keep each of ``fractions`` of its
    parameters, or the explicit ``rungs``), BatchNorm statistics are re-estimated on ``loader``
    (unless ``bn_recalibrate=False``), and top-1 and mean cross-entropy are measured on
    ``loader``; the costs are relative to the dense model after the same re-estimation. The model
    is not changed (a copy is measured).

    Args:
        model: the trained dense model.
        loader: calibration batches of ``(images, labels)`` from a held-out split (not the test
            split); used both to re-estimate BatchNorm and to measure.
        config: decides the method(s) (``method="auto"``: every auto method), ``align`` and the
            methods' options; default ``CompressConfig(method="tucker2", budget=0.5,
            budget_kind="macs", allocation="measured")``.
        filter_fn: selects layers as in :func:`tensorcut.plan` (default: every conv but stems).
        methods: measure these methods instead of the config's.
        fractions: parameter fractions of each layer's ladder, each in (0, 1).
        rungs: explicit ``{layer: [(method, ranks), ...]}`` instead of the fraction ladder for the
            layers named (ranks may exceed the dense size, e.g. the full ranks for a check).
        layers: explicit layer names instead of ``filter_fn``.
        objective: what ``allocation="measured"`` will minimise: ``"loss"`` (summed calibration
            loss increase; smooth, the default) or ``"top1"`` (summed top-1 drop).
        bn_recalibrate: re-estimate BatchNorm statistics before each measurement (and the
            baseline).
        max_batches: use at most this many batches of ``loader`` per pass.
        device: where to run the passes.
        progress: show a progress bar and a closing line.

    Returns:
        A :class:`DropTable`.

    Raises:
        TensorcutError: an empty loader or one without labels, an unknown method or layer, a
            fraction outside (0, 1), an unknown objective, or as :func:`tensorcut.plan`.

    Example:
        >>> cfg = tc.CompressConfig(method="tucker2", budget=0.5, budget_kind="macs",
        ...                         allocation="measured")
        >>> drops = measure_layer_drops(model, calib_loader, cfg)  # doctest: +SKIP
        >>> small, plan = tc.compress(model, cfg, drops=drops, input_shape=(1, 28, 28))
    """
    from tensorcut.compression._builder import rel_error
    from tensorcut.compression.selection import select_layers
    from tensorcut.layers import get_method, list_methods
    from tensorcut.train.loop import recalibrate_bn

    t0 = time.perf_counter()
    if objective not in OBJECTIVES:
        raise TensorcutError(
            f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}"
        )
    bad = [f for f in fractions if not (isinstance(f, (int, float)) and 0 < f < 1)]
    if not fractions or bad:
        raise TensorcutError(
            f"fractions are parameter fractions in (0, 1), e.g. (0.5, 0.25), got {tuple(fractions)}"
        )
    if max_batches is not None and max_batches < 1:
        raise TensorcutError(f"max_batches must be >= 1 (or None for all), got {max_batches}")
    cfg = config or CompressConfig(
        method=DEFAULT_METHOD, budget=0.5, budget_kind="macs", allocation="measured"
    )
    if methods is None:
        methods = list_methods(auto=True) if cfg.method == "auto" else [cfg.method]
    for m in methods:
        get_method(m)  # an unknown name: one line with the choices
    dev = torch.device(device)
    x0 = _first_batch(loader)
    work = copy.deepcopy(model).to(dev).eval()
    sel = select_layers(work, cfg, filter_fn, layers=layers, calibration=x0[:8].to(dev))
    unknown = [n for n in (rungs or {}) if n not in sel.builders]
    if unknown:
        raise TensorcutError(
            f"rungs name layer {unknown[0]!r}, which is not among the layers to measure: "
            f"{', '.join(sel.builders)}"
        )
    todo: list[tuple[str, str, tuple[int, ...]]] = []
    skipped: dict[str, list[str]] = {n: [] for n in sel.builders}
    for n, b in sel.builders.items():
        if rungs is not None and n in rungs:
            todo += [(n, str(m), tuple(int(v) for v in r)) for m, r in rungs[n]]
            continue
        for m in methods:
            try:
                todo += [(n, m, r) for r in ladder_ranks(b, m, fractions)]
            except TensorcutError as e:
                skipped[n].append(f"{m}: {e}")

    if bn_recalibrate:
        recalibrate_bn(work, loader, dev, max_batches)
    base_top1, base_loss, images = _score(work, loader, dev, max_batches)
    options: dict[str, list[MeasuredOption]] = {n: [] for n in sel.builders}
    bar = tqdm(todo, desc="measure layer drops", leave=False, disable=None if progress else True)
    for n, m, r in bar:
        b = sel.builders[n]
        try:
            layer = b.build(m, r)
        except (TensorcutError, ConvergenceError) as e:
            skipped[n].append(f"{m} {'x'.join(map(str, r))}: {e}")
            continue
        w = b.conv.weight
        layer = layer.to(device=w.device, dtype=w.dtype)
        original = sel.convs[n]
        names = (n, *sel.aliases[n])
        for a in names:
            work.set_submodule(a, layer)
        try:
            if bn_recalibrate:
                recalibrate_bn(work, loader, dev, max_batches)
            top1, loss, _ = _score(work, loader, dev, max_batches)
        finally:
            for a in names:
                work.set_submodule(a, original)
        if not math.isfinite(loss):
            skipped[n].append(f"{m} {'x'.join(map(str, r))}: the loss is not finite")
            continue
        options[n].append(
            MeasuredOption(
                method=m,
                ranks=[int(v) for v in layer.ranks],
                params=b.params(m, tuple(layer.ranks)),
                macs=b.macs(m, tuple(layer.ranks)),
                error=rel_error(b.conv.weight, layer),
                top1=top1,
                loss=loss,
                top1_drop=base_top1 - top1,
                loss_increase=loss - base_loss,
            )
        )
    table = DropTable(
        layers=[
            LayerDrops(n, b.geom.dense_params(), b.dense_macs(), options[n], skipped[n])
            for n, b in sel.builders.items()
        ],
        baseline_top1=base_top1,
        baseline_loss=base_loss,
        images=images,
        input_shape=list(sel.shape),
        methods=list(methods),
        objective=objective,
        bn_recalibrated=bn_recalibrate,
        seconds=round(time.perf_counter() - t0, 1),
    )
    say(
        f"measured {sum(len(v) for v in options.values())} options of {len(options)} layers on "
        f"{images} calibration images in {table.seconds:.0f} s (baseline top-1 "
        f"{base_top1:.4f}, loss {base_loss:.4f})",
        progress,
    )
    return table
