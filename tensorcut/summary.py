"""Per-layer inventory of a model: every conv and linear layer with its shape, parameters and
MACs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "LatencyReport",
    "LayerRow",
    "ModelSummary",
    "measure_model_latency",
    "probe",
    "summarize",
]


def probe(model: nn.Module, input_shape: Sequence[int], handles: list[Any]) -> None:
    """Run one zero image of shape ``input_shape`` (C, H, W) through ``model`` in eval mode, without
    gradients, so that the hooks in ``handles`` record what they need; removes them and restores
    the training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        ref = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=ref.dtype, device=ref.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@dataclass
class LayerRow:
    """One conv / linear / factorized layer."""

    name: str
    kind: str
    shape: str
    params: int
    macs: int
    ranks: str = ""
    dense_params: int = 0

    @property
    def ratio(self) -> float:
        """Dense parameters / stored parameters (1.0 for a dense layer)."""
        return self.dense_params / self.params if self.params else 1.0


@dataclass
class ModelSummary:
    """The rows plus model totals. MACs are per image at ``input_shape``."""

    rows: list[LayerRow]
    total_params: int
    total_macs: int
    input_shape: tuple[int, int, int]
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """A fixed-width text table for terminals."""
        head = ("layer", "type", "weight shape", "ranks", "params", "MACs", "CR")
        body = [
            (r.name, r.kind, r.shape, r.ranks, f"{r.params:,}", f"{r.macs:,}", f"{r.ratio:.2f}")
            for r in self.rows
        ]
        layer_p = sum(r.params for r in self.rows)
        body.append(
            (
                "total (listed layers)",
                "",
                "",
                "",
                f"{layer_p:,}",
                f"{sum(r.macs for r in self.rows):,}",
                "",
            )
        )
        body.append(
            (
                "total (whole model)",
                "",
                "",
                "",
                f"{self.total_params:,}",
                f"{self.total_macs:,}",
                "",
            )
        )
        widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]

        def fmt(row: Sequence[Any]) -> str:
            return "  ".join(
                str(c).rjust(w) if i >= 4 else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )

        lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
        c, h, w = self.input_shape
        lines.append(
            f"MACs are multiply-accumulates per image at input {c}x{h}x{w}; CR = dense / stored "
            "parameters."
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "rows": [asdict(r) for r in self.rows],
            "total_params": self.total_params,
            "total_macs": self.total_macs,
            "input_shape": list(self.input_shape),
        }


def summarize(model: nn.Module, input_shape: Sequence[int]) -> ModelSummary:
    """Trace one input of shape ``input_shape`` (C, H, W) and list every conv / linear layer.

    A factorized layer (CP, Tucker, TT, TR, SVDLinear) is one row, counted by its method's
    closed form (:mod:`tensorcut.compression.cost`, the one cost model); its inner convolutions are
    not listed separately. Rows are counted per call; a module shared under several names is one
    row.
    """
    from tensorcut.compression.cost import model_cost
    from tensorcut.compression.effective import refuse_scripted
    from tensorcut.layers.base import FactorizedConv2d
    from tensorcut.layers.linear import SVDLinear

    refuse_scripted(model)  # a TorchScript model would list no layers at all
    cost = model_cost(model, input_shape)
    rows = []
    for u in cost.units:  # the cost model's units: factorized layers, SVDLinear, Conv2d, Linear
        m = u.module
        if isinstance(m, (FactorizedConv2d, SVDLinear)):
            if isinstance(m, FactorizedConv2d):
                g = m.geometry
                dense = g.dense_params()
                kh, kw = g.kernel_size
                shape = f"{g.out_channels}x{g.in_channels // g.groups}x{kh}x{kw}"
            else:
                dense = m.in_features * m.out_features + (
                    m.out_features if m.bias is not None else 0
                )
                shape = f"{m.out_features}x{m.in_features}"
            ranks = "x".join(str(r) for r in m.ranks)
            rows.append(LayerRow(u.name, type(m).__name__, shape, u.params, u.macs, ranks, dense))
        else:
            weight = m.weight
            assert isinstance(weight, torch.Tensor)  # a dense Conv2d or Linear
            shape = "x".join(str(s) for s in weight.shape)
            rows.append(LayerRow(u.name, type(m).__name__, shape, u.params, u.macs, "", u.params))
    c, h, w = (tuple(input_shape) + (1, 1, 1))[:3]
    return ModelSummary(rows, cost.total_params, cost.total_macs, (int(c), int(h), int(w)))


@dataclass(frozen=True)
class LatencyReport:
    """The latency of a model (and, for a compressed one, of its dense equivalent, timed with it)
    as :func:`tensorcut.timing.measure_latency` measures it; for ``inspect --latency``."""

    stats: dict[str, Any]  # name -> LatencyStats: "model", and "dense equivalent" when compressed
    comparison: Any = None  # tensorcut.timing.Comparison of model / dense equivalent, or None

    def lines(self) -> list[str]:
        """One line per timed model (median, IQR, batch, threads, device, reps, warm-up) and the
        verdict ("no measurable difference" when the ratio's spread covers 1)."""
        out = [f"latency, {n}: {st.describe()}" for n, st in self.stats.items()]
        if self.comparison is not None:
            out.append(f"latency, compressed vs dense equivalent: {self.comparison.describe()}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (raw times included)."""
        return {
            "stats": {n: st.to_dict() for n, st in self.stats.items()},
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
        }


def _dense_equivalent(model: nn.Module) -> nn.Module | None:
    """A copy with every factorized layer replaced by the dense layer it computes; None when
    the model has no factorized layer."""
    import copy

    from tensorcut.layers.base import FactorizedConv2d
    from tensorcut.layers.linear import SVDLinear

    if not any(isinstance(m, (FactorizedConv2d, SVDLinear)) for m in model.modules()):
        return None
    out = copy.deepcopy(model)
    done: dict[int, nn.Module] = {}
    for n, m in list(out.named_modules(remove_duplicate=False)):
        if isinstance(m, (FactorizedConv2d, SVDLinear)):
            if id(m) not in done:
                done[id(m)] = m.to_conv() if isinstance(m, FactorizedConv2d) else m.to_linear()
            out.set_submodule(n, done[id(m)])
    return out


def measure_model_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch: int = 1,
    threads: int | None = None,
    warmup: int = 3,
    reps: int = 15,
) -> LatencyReport:
    """Time ``model`` (evaluation mode, random input of ``batch`` x ``input_shape``) with the one
    timer; a compressed model is timed interleaved with its dense equivalent and compared."""
    from tensorcut.errors import TensorcutError
    from tensorcut.timing import compare, measure_latency

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise TensorcutError(f"latency batch must be an integer >= 1, got {batch!r}")
    ref = next(model.parameters())
    models: dict[str, nn.Module] = {"model": model.eval()}
    dense = _dense_equivalent(model)
    if dense is not None:
        models["dense equivalent"] = dense.eval()
    x = torch.randn(batch, *input_shape, dtype=ref.dtype, device=ref.device)
    st = measure_latency(models, x, threads=threads, warmup=warmup, reps=reps)
    cmp = compare(st["model"], st["dense equivalent"]) if dense is not None else None
    return LatencyReport(dict(st), cmp)
