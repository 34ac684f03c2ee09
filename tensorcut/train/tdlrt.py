"""Rank-adaptive Tucker training (TDLRT): convolutions trained directly in Tucker format.

Implements the integrator of Zangrando, Schotthöfer, Ceruti, Kusch and Tudisco,
"Geometry-aware training of factorized layers in tensor Tucker format" (arXiv 2305.19059,
first titled "Rank-adaptive spectral pruning of convolutional layers during training"),
which extends matrix DLRT ("Low-rank lottery tickets", NeurIPS 2022) to Tucker tensors.

Every :class:`~tensorcut.layers.tucker.TuckerConv2d` (Tucker-2: the OUT and IN channel modes
are dynamic, the spatial modes stay in the core) is stored as ``first`` (1x1, weight
``U_in^T``), ``core`` (the core ``C``, carrying stride and dilation) and ``last`` (1x1, weight
``U_out``, bias), so the result of training is the same layer class the compression verbs
produce, and save / load / export / inspect work unchanged. The integrator rewrites those
three weights in place; their shapes change when the ranks do.

Entry points, all importable from here: :func:`tuckerize` (dense convs -> Tucker layers, by
HOSVD of pretrained kernels or a random orthonormal start; :mod:`~tensorcut.train.tdlrt_convert`),
:class:`TDLRTOptimizer` (one integrator step per ``step(closure)``;
:mod:`~tensorcut.train.tdlrt_optim`), :class:`TDLRTStep` (the integrator as a step of
:func:`~tensorcut.train.loop.fit`), :func:`train_tdlrt` (``tuckerize`` + ``fit`` with logging of
ranks and compression) and :func:`rank_report` (:mod:`~tensorcut.train.tdlrt_layers`, the view
of a layer's factors). The tensor algebra of a step is :mod:`~tensorcut.train.tdlrt_ops`.

Under ``torchrun`` (any initialised process group of world size > 1) both the optimiser and
the loop are data-parallel with DistributedDataParallel semantics, without DDP itself (whose
gradient buckets cannot follow parameters that change shape every step): see
:class:`TDLRTOptimizer` ("Several processes") and :func:`train_tdlrt`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorcut import distributed as tdist
from tensorcut.console import say
from tensorcut.errors import TensorcutError
from tensorcut.train.config import FitConfig, Optimizer, Scheduler
from tensorcut.train.loop import fit, resolve_device
from tensorcut.train.steps import TrainStep
from tensorcut.train.tdlrt_convert import ConvFilter, RankArg, tdlrt_plan, tuckerize
from tensorcut.train.tdlrt_layers import (
    TuckerView,
    check_hparams,
    is_tucker_layer,
    rank_report,
)
from tensorcut.train.tdlrt_optim import BASES, TDLRTOptimizer

__all__ = [
    "BASES",
    "SCHEDULERS",
    "TDLRTOptimizer",
    "TDLRTStep",
    "TuckerView",
    "format_row",
    "is_tucker_layer",
    "rank_callback",
    "rank_report",
    "tdlrt_plan",
    "tdlrt_recipe",
    "train_tdlrt",
    "tuckerize",
]

SCHEDULERS = ("none", "cosine", "plateau", "onecycle")

#: TDLRT's learning rate per base optimiser when none is given: the rates at which it reached
#: dense accuracy in ``benchmarks/bench_tdlrt.py`` (vanilla-cnn / digits, 5 seeds), where the
#: dense recipe's Adam 1e-3 left it 2 points under dense.
TDLRT_LR: dict[str, float] = {"sgd": 0.1, "adam": 3e-3}


def tdlrt_recipe(
    optimizer: Optimizer | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    scheduler: Scheduler | None = None,
) -> dict[str, Any]:
    """TDLRT's recipe with the given values applied: SGD lr 0.1 momentum 0.9, cosine schedule.

    An optimiser chosen without a learning rate gets its own rate from :data:`TDLRT_LR`
    (Adam 3e-3), not the other optimiser's.

    Args:
        optimizer, lr, momentum, weight_decay, scheduler: given values; ``None`` takes the
            default.

    Returns:
        Keyword arguments for :func:`train_tdlrt` (``optimizer``, ``lr``, ``momentum``,
        ``weight_decay``, ``scheduler``).

    Raises:
        TensorcutError: an optimiser TDLRT has no default rate for.

    Example:
        >>> tdlrt_recipe(optimizer="adam")["lr"]
        0.003
        >>> tdlrt_recipe()["scheduler"]
        'cosine'
    """
    opt = optimizer or "sgd"
    if opt not in TDLRT_LR:
        raise TensorcutError(
            f"unknown base optimizer {opt!r}; choose one of: {', '.join(TDLRT_LR)}"
        )
    return {
        "optimizer": opt,
        "lr": TDLRT_LR[opt] if lr is None else lr,
        "momentum": 0.9 if momentum is None else momentum,
        "weight_decay": 0.0 if weight_decay is None else weight_decay,
        "scheduler": scheduler or "cosine",
    }


class TDLRTStep(TrainStep):
    """The TDLRT integrator as :func:`~tensorcut.train.loop.fit`'s step: each batch augments the
    Tucker bases, updates them and the core with the recipe's optimiser, and truncates the ranks
    at ``tau`` (:class:`TDLRTOptimizer`). The integrator averages gradients over processes
    itself, so ``fit`` does not wrap the model in DDP.

    Args:
        tau: relative truncation tolerance.
        rmin, rmax: rank bounds per mode.
        nesterov: Nesterov momentum for the SGD base (off, as in the reference code).

    Example:
        >>> from tensorcut.train import FitConfig, fit
        >>> from tensorcut.train.tdlrt import TDLRTStep, rank_callback, tuckerize
        >>> tuckerize(model, init_rank=16)  # doctest: +SKIP
        >>> fit(model, train, val, FitConfig(optimizer="sgd", lr=0.05, scheduler="none"),
        ...     step=TDLRTStep(tau=0.1), callbacks=[rank_callback])  # doctest: +SKIP
    """

    syncs_ranks = True
    label = "tdlrt "

    def __init__(
        self, tau: float, *, rmin: int = 2, rmax: int | None = None, nesterov: bool = False
    ) -> None:
        self.tau, self.rmin, self.rmax, self.nesterov = tau, rmin, rmax, nesterov

    def setup(
        self,
        model: nn.Module,
        cfg: FitConfig,
        ctx: tdist.DistContext,
        device: torch.device,
        teacher: nn.Module | None,
    ) -> None:
        if cfg.amp:
            raise TensorcutError("TDLRT trains in full precision; drop amp")
        if teacher is not None and cfg.distill_alpha > 0:
            raise TensorcutError("TDLRT has no distillation term; drop the teacher")
        self.model = model
        self.integrator = TDLRTOptimizer(
            model,
            self.tau,
            rmin=self.rmin,
            rmax=self.rmax,
            base=cfg.optimizer,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=self.nesterov,
            grad_clip=cfg.grad_clip,
            distributed=ctx.enabled,
        )
        self.optimizer = self.integrator.base

    def __call__(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            seen.setdefault("logits", logits.detach())
            return loss

        loss = self.integrator.step(closure)
        return loss.detach(), seen["logits"]

    def state_dict(self) -> dict[str, Any]:
        return self.integrator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.integrator.load_state_dict(state)

    def report(self, row: dict[str, Any]) -> None:
        say(format_row(row))


def rank_callback(row: dict[str, Any], model: nn.Module) -> None:
    """``fit`` callback: add the epoch's Tucker ranks and conv compression to its history row.

    Args:
        row: the epoch's history row; gains ``ranks`` (``{layer: [r_out, r_in]}``),
            ``conv_params``, ``conv_dense_params``, ``conv_cr`` and ``conv_compression_pct``.
        model: the model being trained.

    Example:
        >>> fit(model, train, val, cfg, step=TDLRTStep(0.1), callbacks=[rank_callback])
    """
    rep = rank_report(model)
    row.update(
        ranks={k: v["ranks"] for k, v in rep["layers"].items()},
        conv_params=rep["conv_params"],
        conv_dense_params=rep["conv_dense_params"],
        conv_cr=rep["conv_cr"],
        conv_compression_pct=rep["conv_compression_pct"],
    )


def train_tdlrt(
    model: nn.Module,
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    *,
    tau: float,
    init_rank: RankArg = None,
    rmin: int = 2,
    rmax: int | None = None,
    epochs: int = 10,
    optimizer: Optimizer = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    scheduler: Scheduler = "cosine",
    from_pretrained: bool = True,
    convert: bool = True,
    filter: ConvFilter | None = None,
    skip_first: bool = True,
    grad_clip: float | None = None,
    device: str | torch.device = "auto",
    log: Callable[[dict[str, Any]], None] | None = None,
    distributed: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``model`` with TDLRT (converting its convolutions first) and return one row per epoch.

    A convenience over the one epoch loop: :func:`tuckerize`, then
    :func:`~tensorcut.train.loop.fit` with a :class:`TDLRTStep` and :func:`rank_callback`
    (the recipe arguments become its :class:`~tensorcut.train.loop.FitConfig`).

    ``progress``: a progress bar over each epoch's batches (shown only on a terminal, as
    :func:`~tensorcut.train.loop.fit` does) and one line per epoch (loss, validation top-1,
    conv compression, ranks) through the ``tensorcut`` logger; rank 0 alone under ``torchrun``.

    ``convert=True`` runs :func:`tuckerize` (``init_rank``, ``from_pretrained``, ``filter``,
    ``skip_first``); with ``convert=False`` the model must already hold Tucker layers. The
    model is changed in place. Each history row has ``epoch``, ``train_loss``,
    ``train_top1``, ``lr``, ``seconds`` (wall time of the epoch's training), with a
    validation loader ``val_loss`` / ``val_top1`` / ``val_top5``, and ``ranks``
    (``{layer: [r_out, r_in]}``), ``conv_params``, ``conv_dense_params``, ``conv_cr`` and
    ``conv_compression_pct``; ``log(row)`` is called after every epoch.

    Under ``torchrun`` (or any initialised process group; ``distributed=False`` opts out) the
    loader's batch size is the *global* batch: a plain DataLoader is split over the ranks by a
    DistributedSampler (shuffle seeded by ``seed`` and the epoch), gradients are averaged by
    :class:`TDLRTOptimizer`, and the history's metrics are reduced over all ranks, so every
    rank returns the same rows (but for ``seconds``) and holds the same model. ``log`` runs on
    every rank (write files through :func:`tensorcut.distributed.run_on_main`). Each rank seeds
    its RNG with ``seed + rank`` after the model is converted (as ``fit`` does), so dropout
    masks differ per rank.

    Args:
        model: the network (converted and trained in place).
        train_loader, val_loader: batches of ``(images, labels)``; validation is optional.
        tau: relative truncation tolerance in ``[0, 1)``.
        init_rank, rmin, rmax, from_pretrained, filter, skip_first: see :func:`tuckerize`.
        epochs, optimizer, lr, momentum, weight_decay, scheduler, grad_clip, seed: the recipe.
            The default, SGD lr 0.1 momentum 0.9 with a cosine schedule, is twice the SGD rate
            that suits dense training: a network held at half rank learns more slowly per step
            (benchmarks/results/tdlrt.md; with Adam, about 3x the dense rate, e.g. 3e-3).
        convert: run :func:`tuckerize` first.
        device, distributed, progress: as for :func:`~tensorcut.train.loop.fit`.
        log: ``log(row)`` after every epoch.

    Returns:
        One history row per epoch.

    Raises:
        TensorcutError: a setting out of range, a model without Tucker layers, divergence.

    Example:
        >>> hist = train_tdlrt(model, train, val, tau=0.1, epochs=5)  # doctest: +SKIP
        >>> hist[-1]["ranks"], hist[-1]["conv_compression_pct"]  # doctest: +SKIP
    """

    check_hparams(tau, rmin, rmax, lr)
    if epochs < 0:
        raise TensorcutError(f"epochs must be >= 0; got {epochs}")
    if scheduler not in SCHEDULERS:
        raise TensorcutError(
            f"unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}"
        )
    if optimizer not in BASES:
        raise TensorcutError(
            f"unknown base optimizer {optimizer!r}; choose one of: {', '.join(BASES)}"
        )
    if not 0.0 <= momentum < 1.0:
        raise TensorcutError(f"momentum must be in [0, 1); got {momentum}")
    cfg = FitConfig(
        epochs=epochs,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        scheduler=scheduler,
        seed=seed,
        grad_clip=grad_clip,
    )
    dev = resolve_device(device)
    ctx = tdist.init(dev) if distributed else tdist.DistContext(device=dev)
    if ctx.enabled:
        dev = ctx.device
    model.to(dev)
    if convert:
        tuckerize(
            model,
            init_rank,
            from_pretrained=from_pretrained,
            rmin=rmin,
            rmax=rmax,
            filter=filter,
            skip_first=skip_first,
        )
    return fit(
        model,
        train_loader,  # type: ignore[arg-type]
        val_loader,  # type: ignore[arg-type]
        cfg,
        device=dev,
        progress=progress,
        on_epoch=log,
        distributed=distributed,
        step=TDLRTStep(tau, rmin=rmin, rmax=rmax),
        callbacks=[rank_callback],
    )


def format_row(row: dict[str, Any]) -> str:
    """One console line for a :func:`train_tdlrt` history row."""
    ranks = " ".join(f"{a}/{b}" for a, b in row["ranks"].values())
    return (
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} | "
        f"val loss {row.get('val_loss', float('nan')):.4f} "
        f"top1 {row.get('val_top1', float('nan')):.4f} | "
        f"conv compression {row['conv_compression_pct']:.1f}% | ranks {ranks} | "
        f"{row['seconds']:.1f}s"
    )
