"""The plan: one :class:`LayerPlan` per listed convolution plus totals; JSON round trip and
table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tensorcut.errors import TensorcutError

__all__ = ["LayerPlan", "Plan"]


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
    #: what the module computes (tensorcut.compression.effective), e.g. "timm StdConv2d
    #: (standardised kernel)"
    kind: str = ""
    aliases: list[str] = field(
        default_factory=list
    )  # further names of the same module (shared convs)
    calls: int = 1  # calls per forward pass (MACs count every call)
    #: the measured allocation's choice for this layer (allocation="measured"): the objective, the
    #: chosen option (method, ranks, cost, measured loss increase and top-1 drop), the dense cost
    #: and how many options were offered; None for the other rules
    measured: dict[str, Any] | None = None

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
    """Per-layer decisions plus the config and totals. JSON round-trips through :meth:`to_json`.

    Made by :func:`tensorcut.plan` (pure: the model is not changed), applied by
    :func:`tensorcut.apply`; :meth:`save` / :meth:`load` write and read it as JSON.

    Example:
        >>> import tensorcut as tc
        >>> p = tc.plan(model, ratio=0.3, input_shape=(3, 32, 32))  # doctest: +SKIP
        >>> print(p.table())  # doctest: +SKIP
        >>> p.save("plan.json")  # doctest: +SKIP
    """

    config: dict[str, Any]
    layers: list[LayerPlan]
    input_shape: list[int]
    model_params: int
    model_macs: int
    model_output_error: float | None = (
        None  # set by compress: ||y~ - y|| / ||y|| of the whole model on the calibration batch
    )
    _built: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)
    # the capture pass's input and the dense model's output on it, reused by compress's whole-model
    # check
    _reference: tuple[tuple[Any, ...], Any] | None = field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------- totals
    def totals(self) -> dict[str, Any]:
        """Conv-layer and whole-model parameter / MAC totals before and after."""
        pb = sum(lp.params_before for lp in self.layers)
        pa = sum(
            lp.params_after if lp.status == "factorize" else lp.params_before for lp in self.layers
        )
        mb = sum(lp.macs_before for lp in self.layers)
        ma = sum(
            lp.macs_after if lp.status == "factorize" else lp.macs_before for lp in self.layers
        )
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
            "factorized_layers": sum(lp.status == "factorize" for lp in self.layers),
            "dense_layers": sum(lp.status != "factorize" for lp in self.layers),
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
        for lp in self.layers:
            fact = lp.status == "factorize"
            rows.append(
                (
                    lp.name,
                    lp.method if fact else "-",
                    "x".join(map(str, lp.ranks)) if fact else "-",
                    f"{lp.params_before:,}",
                    f"{lp.params_after:,}" if fact else "=",
                    f"{lp.ratio:.2f}" if fact else "1.00",
                    f"{lp.macs_after:,}" if fact else "=",
                    f"{lp.mac_ratio:.2f}" if fact else "1.00",
                    f"{lp.error:.4f}" if (fact and lp.error is not None) else "-",
                    f"{lp.output_error:.4f}" if (fact and lp.output_error is not None) else "-",
                    "factorize" + (f" ({lp.note})" if lp.note else "")
                    if fact
                    else f"dense: {lp.reason}",
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
            "PCR = dense / stored parameters; FCR = dense / factorized MACs; rel.err = ||W - "
            "W~||_F / ||W||_F of the kernel; "
            "out.err = ||y~ - y|| / ||y|| of the layer's output on its captured calibration "
            "input; MACs per image at input " + "x".join(map(str, self.input_shape)) + "."
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
            "layers": [asdict(lp) for lp in self.layers],
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
            layers = [LayerPlan(**lp) for lp in d["layers"]]
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
        from tensorcut.checkpoint.io import atomic_write_text

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
