"""Low-rank linear layer: ``W ~= U_k S_k V_k^T`` as two Linear layers.

``first`` (in -> k, no bias, weight ``sqrt(S_k) V_k^T``) then ``last`` (k -> out, weight
``U_k sqrt(S_k)``, the layer's bias). Splitting ``sqrt(S)`` evenly keeps both factors at the
same scale, which behaves better when fine-tuning than putting ``S`` on one side.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from tensorcut.decompose.svd import clamp_rank, truncated_svd
from tensorcut.errors import TensorcutError
from tensorcut.layers._registry import register_layer

__all__ = ["SVDLinear"]


@register_layer
class SVDLinear(nn.Module):
    """Rank-``k`` factorization of an ``nn.Linear``: ``in -> k -> out``.

    Parameters ``k * (in + out)`` (+ out bias); MACs per sample the same count.
    """

    method: ClassVar[str] = (
        "svd"  # the name checkpoints record (tensorcut.checkpoint.io rebuilds it by this name)
    )

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise TensorcutError(f"SVDLinear rank must be an integer >= 1; got {rank!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        k: dict[str, Any] = {
            "device": "cpu" if device is None else device,
            "dtype": dtype,
        }  # not "meta"
        self.first = nn.utils.skip_init(nn.Linear, self.in_features, rank, bias=False, **k)
        self.last = nn.utils.skip_init(nn.Linear, rank, self.out_features, bias=bias, **k)
        with torch.no_grad():  # filled by from_linear or a checkpoint; zeros, not garbage
            for p in self.parameters():
                p.zero_()
        self.rel_error: float | None = None  # set by from_linear

    @property
    def rank(self) -> int:
        """The inner dimension ``k``."""
        return self.first.out_features

    @property
    def ranks(self) -> tuple[int, ...]:
        """``(k,)``, for symmetry with the factorized convolutions."""
        return (self.rank,)

    @property
    def bias(self) -> torch.Tensor | None:
        """The output bias (held by ``last``)."""
        return self.last.bias

    @staticmethod
    def max_rank(in_features: int, out_features: int) -> int:
        """Largest useful rank: ``min(in, out)``."""
        return min(int(in_features), int(out_features))

    @staticmethod
    def predicted_params(in_features: int, out_features: int, rank: int, bias: bool = True) -> int:
        """``k * (in + out)`` plus the bias."""
        return int(rank) * (int(in_features) + int(out_features)) + (
            int(out_features) if bias else 0
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        *,
        eps: float | None = None,
        energy: float | None = None,
        randomized: bool = False,
        seed: int = 0,
    ) -> SVDLinear:
        """Truncated SVD of ``linear.weight``: give ``rank`` (clamped to ``min(in, out)`` with a
        warning), ``eps`` (relative Frobenius error bound) or ``energy`` (kept fraction); with
        none the factorization is exact (full rank). ``randomized`` uses a seeded sketch.
        """
        if not isinstance(linear, nn.Linear):
            raise TensorcutError(f"from_linear needs an nn.Linear; got {type(linear).__name__}")
        if sum(x is not None for x in (rank, eps, energy)) > 1:
            raise TensorcutError("give one of rank, eps, energy")
        W = linear.weight.detach()
        full = cls.max_rank(linear.in_features, linear.out_features)
        k = None if rank is None else clamp_rank(rank, full, name="SVDLinear rank")
        U, S, Vh = truncated_svd(
            W.to(torch.float64), k, eps=eps, energy=energy, randomized=randomized, seed=seed
        )
        root = S.sqrt()
        layer = cls(
            linear.in_features,
            linear.out_features,
            int(S.numel()),
            bias=linear.bias is not None,
            device=W.device,
            dtype=W.dtype,
        )
        with torch.no_grad():
            layer.first.weight.copy_((root[:, None] * Vh).to(W))
            layer.last.weight.copy_((U * root).to(W))
            if linear.bias is not None:
                layer.last.bias.copy_(linear.bias.detach())
        norm = float(torch.linalg.vector_norm(W, dtype=torch.float64))
        err = float(
            torch.linalg.vector_norm(W.double() - layer.reconstruct_weight().detach().double())
        )
        layer.rel_error = err / norm if norm > 0 else 0.0
        return layer

    def reconstruct_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight."""
        return self.last.weight @ self.first.weight

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function."""
        W = self.reconstruct_weight()
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=W.device,
            dtype=W.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(W)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def num_params(self) -> int:
        """Stored parameters (bias included)."""
        return sum(p.numel() for p in self.parameters())

    def macs(self, batch_shape: tuple[int, ...] = ()) -> int:
        """Multiply-accumulates for one sample (times ``prod(batch_shape)``)."""
        n = 1
        for s in batch_shape:
            n *= int(s)
        return n * self.rank * (self.in_features + self.out_features)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments."""
        return {
            "method": self.method,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SVDLinear:
        """Rebuild the (zero-filled) layer described by :meth:`config`; load a state_dict next."""
        return cls(
            int(cfg["in_features"]),
            int(cfg["out_features"]),
            int(cfg["rank"]),
            bias=bool(cfg.get("bias", True)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
