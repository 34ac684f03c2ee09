"""What :func:`~tensorcut.train.loop.fit` does with one batch: a :class:`TrainStep`.

:class:`BackpropStep` (the default) is plain backpropagation with the recipe's optimiser (mixed
precision, gradient clipping, knowledge distillation); a training method with its own update
subclasses :class:`TrainStep` (the TDLRT integrator, :class:`tensorcut.train.tdlrt.TDLRTStep`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tensorcut import distributed as tdist
from tensorcut.train.config import FitConfig

__all__ = ["BackpropStep", "TrainStep", "format_row", "make_optimizer"]


def make_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``model``'s trainable parameters.

    Args:
        model: the network (parameters with ``requires_grad`` only).
        cfg: the recipe: ``adam`` (lr, weight decay) or ``sgd`` (lr, momentum, Nesterov when
            the momentum is > 0, weight decay).

    Returns:
        A ``torch.optim.Adam`` or ``torch.optim.SGD``.

    Example:
        >>> opt = make_optimizer(nn.Linear(2, 2), FitConfig(optimizer="sgd", lr=0.1))
        >>> type(opt).__name__, opt.defaults["nesterov"]
        ('SGD', True)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.momentum > 0,
    )


class TrainStep:
    """One optimisation step per batch, the part of :func:`~tensorcut.train.loop.fit` a
    training method replaces.

    :meth:`setup` builds the optimiser from the :class:`FitConfig` once the model is on its
    device; ``__call__`` runs forward, backward and the update for one batch and returns the
    loss and the logits. A step whose ``syncs_ranks`` is true keeps processes in step itself
    (gradients and buffers), so ``fit`` neither wraps the model in DDP nor broadcasts buffers.
    """

    #: the step averages gradients and buffers over processes itself
    syncs_ranks: ClassVar[bool] = False
    #: progress-bar prefix, e.g. ``"tdlrt "``
    label: ClassVar[str] = ""
    #: the optimiser whose learning rate the scheduler drives (set by :meth:`setup`)
    optimizer: torch.optim.Optimizer

    def setup(
        self,
        model: nn.Module,
        cfg: FitConfig,
        ctx: tdist.DistContext,
        device: torch.device,
        teacher: nn.Module | None,
    ) -> None:
        """Build the optimiser (and whatever else the step needs) for ``model``."""
        raise NotImplementedError

    def __call__(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the parameters on one batch; returns ``(loss, logits)``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (the optimiser state)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def report(self, row: dict[str, Any]) -> None:
        """Print the epoch's one console line."""
        tqdm.write(format_row(row))


class BackpropStep(TrainStep):
    """Plain backpropagation with the recipe's optimiser: mixed precision (``amp``), gradient
    clipping and knowledge distillation from ``teacher`` (``distill_alpha``)."""

    def setup(
        self,
        model: nn.Module,
        cfg: FitConfig,
        ctx: tdist.DistContext,
        device: torch.device,
        teacher: nn.Module | None,
    ) -> None:
        self.model, self.cfg, self.teacher = model, cfg, teacher
        self.optimizer = make_optimizer(model, cfg)
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")

    def __call__(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, opt, scaler = self.cfg, self.optimizer, self.scaler
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=cfg.amp):
            logits = net(x)
            if cfg.amp:
                logits = logits.float()
            loss = F.cross_entropy(logits, y)
            if self.teacher is not None and cfg.distill_alpha > 0:
                with torch.no_grad():
                    t_logits = self.teacher(x)
                T = cfg.distill_temperature
                kd = (
                    F.kl_div(
                        F.log_softmax(logits / T, 1),
                        F.softmax(t_logits.to(logits.dtype) / T, 1),
                        reduction="batchmean",
                    )
                    * T
                    * T
                )
                loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        return loss, logits


def format_row(row: dict[str, Any]) -> str:
    """An epoch's console line: training loss and top-1, validation's when measured, seconds.

    Args:
        row: one history row of :func:`~tensorcut.train.loop.fit`.

    Returns:
        One line of text.

    Example:
        >>> format_row({"epoch": 1, "train_loss": 0.5, "train_top1": 0.8, "seconds": 2.0})
        'epoch 1: train loss 0.5000 top1 0.8000 | 2.0s'
    """
    s = f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.4f}"
    if "val_loss" in row:
        s += f" | val loss {row['val_loss']:.4f} top1 {row['val_top1']:.4f}"
    return s + f" | {row['seconds']:.1f}s"
