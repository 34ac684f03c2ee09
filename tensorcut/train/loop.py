"""The one epoch loop (:func:`fit`) and :func:`evaluate`: schedulers, distillation,
data-parallel training, BatchNorm recalibration.

What happens to one batch is a :class:`~tensorcut.train.steps.TrainStep` (plain
backpropagation, :class:`~tensorcut.train.steps.BackpropStep`, by default; the TDLRT integrator,
:class:`tensorcut.train.tdlrt.TDLRTStep`). What happens around each epoch is a callback
(:mod:`tensorcut.train.callbacks`): resumable checkpoints and early stopping are two, built
from ``fit``'s ``out_dir`` / ``resume`` and ``FitConfig.patience``. The recipe,
:class:`~tensorcut.train.config.FitConfig`, is in :mod:`tensorcut.train.config`; its named
presets in :mod:`tensorcut.train.recipes`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tensorcut import distributed as tdist
from tensorcut.errors import TensorcutError
from tensorcut.train.callbacks import Callback, Checkpoint, EarlyStopping, FitState
from tensorcut.train.config import OPTIMIZERS, SCHEDULERS, FitConfig, check_numbers
from tensorcut.train.steps import BackpropStep, TrainStep

#: FitConfig, its choices and check_numbers (train/config.py), TrainStep and BackpropStep
#: (train/steps.py) stay importable from here for the modules that still import them from the loop
__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "BackpropStep",
    "EpochCallback",
    "FitConfig",
    "TrainStep",
    "check_numbers",
    "evaluate",
    "fit",
    "recalibrate_bn",
    "resolve_device",
    "set_seed",
]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cuda' without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TensorcutError(
            "--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto"
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise TensorcutError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    loader: Any,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
) -> int:
    """Re-estimate every BatchNorm layer's running mean and variance on ``loader``'s inputs.

    Why: replacing a convolution by a factorized one shifts the distribution of its outputs,
    so the BatchNorm after it normalises with stale statistics; before any fine-tuning that
    alone can drop a ResNet to chance. Statistics are reset and re-accumulated as an exact
    average over the batches (``momentum=None``) with the rest of the model in eval mode (no
    dropout); no parameter changes. Returns the number of BatchNorm layers recalibrated.
    """
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return 0
    dev = resolve_device(device)
    was_training = model.training
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(dev))
            seen += 1
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was_training)
    if seen == 0:
        raise TensorcutError("BatchNorm recalibration got no batches; give a non-empty data set")
    return len(bns)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "eval",
    *,
    distributed: bool = True,
) -> dict[str, float]:
    """Mean cross-entropy loss, top-1 and top-5 accuracy of ``model`` over ``loader``.

    Inside an initialised process group (``torchrun``) every rank evaluates a strided share
    of the loader and the sums are all-reduced, so all ranks return the exact metrics of the
    whole set; every rank must call it. ``distributed=False`` evaluates locally.

    Args:
        model: the network (put in eval mode for the pass, then restored).
        loader: batches of ``(images, labels)``.
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``.
        progress: show a progress bar (on a terminal).

    Returns:
        ``{"loss", "top1", "top5", "n"}`` over the whole loader.

    Raises:
        TensorcutError: an unknown or unavailable device.

    Example:
        >>> import tensorcut as tc
        >>> tc.evaluate(model, test_loader)["top1"]  # doctest: +SKIP
    """
    dev = resolve_device(device)
    ctx = tdist.active() if distributed else tdist.DistContext(device=dev)
    shard = tdist.shard_eval_loader(loader, ctx) if ctx.enabled else loader
    reduce = ctx.enabled and shard is not None
    was_training = model.training
    model.eval()
    n, loss_sum, c1, c5 = 0, 0.0, 0, 0
    for x, y in tqdm(
        loader if shard is None else shard,
        desc=desc,
        leave=False,
        disable=None if progress else True,
    ):
        x, y = x.to(dev), y.to(dev)
        logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        c1 += hit[:, 0].sum().item()
        c5 += hit.any(dim=1).sum().item()
        n += y.numel()
    model.train(was_training)
    if reduce:
        loss_sum, c1f, c5f, nf = tdist.all_reduce_sum([loss_sum, c1, c5, n], dev)
        c1, c5, n = int(round(c1f)), int(round(c5f)), int(round(nf))
    if n == 0:
        raise TensorcutError("evaluation set is empty")
    return {"loss": loss_sum / n, "top1": c1 / n, "top5": c5 / n, "n": n}


def _make_scheduler(opt: torch.optim.Optimizer, cfg: FitConfig, steps_per_epoch: int) -> Any:
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=2)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, cfg.epochs * steps_per_epoch)
        )
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * steps_per_epoch)
        )
    return None


#: a plain callback: called after each epoch's validation with the epoch's history row (which
#: it may extend) and the model
EpochCallback = Callable[[dict[str, Any], nn.Module], None]


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    config: FitConfig | None = None,
    *,
    device: str | torch.device = "auto",
    out_dir: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    resume: bool = False,
    teacher: nn.Module | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    distributed: bool = True,
    step: TrainStep | None = None,
    callbacks: Sequence[Callback | EpochCallback] = (),
) -> list[dict[str, Any]]:
    """Train ``model`` and return one history row per epoch.

    With ``out_dir`` a checkpoint (``model.safetensors`` + ``meta.json`` + ``train_state.pt``)
    is written atomically after every epoch; ``resume=True`` continues from it (a
    :class:`~tensorcut.train.callbacks.Checkpoint`). With ``patience`` training stops when
    validation loss has not improved for that many epochs, and the best weights are restored
    (an :class:`~tensorcut.train.callbacks.EarlyStopping`). ``teacher`` enables knowledge
    distillation (``distill_alpha`` weight on the soft-target KL term). ``amp`` trains under
    autocast (float16 with a gradient scaler on CUDA, bfloat16 on CPU).

    Under ``torchrun`` (or any initialised process group; ``distributed=False`` opts out)
    the model is wrapped in DistributedDataParallel, the loader's batch size is the *global*
    batch split evenly over the ranks by a DistributedSampler, metrics are all-reduced, and
    only rank 0 writes the checkpoint. BatchNorm statistics are per rank unless
    ``sync_batchnorm`` (CUDA only). A plain loader's shuffle order is a function of
    ``(seed, epoch)``, so a resumed run sees the same batches as an uninterrupted one.

    Args:
        model: the network to train (in place).
        train_loader: batches of ``(images, labels)``.
        val_loader: for validation metrics, the scheduler and early stopping (optional).
        config: the :class:`FitConfig` recipe (default ``FitConfig()``).
        out_dir, meta, resume: the checkpoint directory, its metadata (naming the
            architecture) and whether to continue from it.
        on_epoch: ``on_epoch(row)`` after each epoch's row is recorded, before it is printed.
        step: what one batch does (default :class:`BackpropStep`; TDLRT passes its integrator,
            :class:`tensorcut.train.tdlrt.TDLRTStep`).
        callbacks: :class:`~tensorcut.train.callbacks.Callback` objects, or functions
            ``callback(row, model)`` called after each epoch's validation, before the row is
            recorded, printed and checkpointed (a callback may add fields to ``row``). They run
            in the order given, before the ones ``out_dir`` and ``patience`` add; a
            ``Checkpoint`` runs last.

    Returns:
        One dict per epoch (``epoch``, ``train_loss``, ``train_top1``, ``val_loss``, ...).

    Raises:
        TensorcutError: a bad recipe, a checkpoint that does not match on resume, ``resume``
            without ``out_dir``, ``out_dir`` beside a ``Checkpoint`` callback.

    Example:
        >>> import tensorcut as tc
        >>> history = tc.fit(model, train_loader, val_loader, tc.FitConfig(epochs=2, lr=1e-3))
    """
    cfg = config or FitConfig()
    hooks = _callbacks(callbacks, cfg, out_dir, meta, resume)
    objects = [cb for cb in hooks if isinstance(cb, Callback)]
    dev = resolve_device(device)
    ctx = tdist.init(dev) if distributed else tdist.DistContext(device=dev)
    if ctx.enabled:
        dev = ctx.device
    set_seed(cfg.seed + ctx.rank)
    model.to(dev)
    if teacher is not None:
        teacher.to(dev).eval()
    train_step = step if step is not None else BackpropStep()
    train_step.setup(model, cfg, ctx, dev, teacher)
    swapped: dict[str, type[nn.Module]] = {}
    net = model
    if not train_step.syncs_ranks:
        net, swapped = _wrap(model, cfg, ctx, dev)
    loader = tdist.shard_train_loader(train_loader, ctx, seed=cfg.seed)
    opt = train_step.optimizer
    try:
        steps_per_epoch = len(loader)
    except TypeError:  # an iterable without a length: the schedule counts one step per epoch
        steps_per_epoch = 1
    sched = _make_scheduler(opt, cfg, steps_per_epoch)
    fs = FitState(model, cfg, train_step, ctx, dev, scheduler=sched, callbacks=objects)
    for cb in objects:
        cb.on_fit_start(fs)
    for epoch in range(fs.epoch, cfg.epochs):
        model.train()
        tdist.set_epoch(loader, epoch)
        t0 = time.perf_counter()
        tot, n, correct = 0.0, 0, 0
        bar = tqdm(
            loader,
            desc=f"{train_step.label}epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=None if progress and ctx.is_main else True,
        )
        for x, y in bar:
            x, y = x.to(dev), y.to(dev)
            loss, logits = train_step(net, x, y)
            if cfg.scheduler in ("cosine", "onecycle"):
                sched.step()
            sums = [loss.item() * y.numel(), y.numel(), (logits.argmax(1) == y).sum().item()]
            if ctx.enabled:  # one small all-reduce per step: exact global metrics, and every
                # rank sees divergence
                sums = tdist.all_reduce_sum(sums, dev)
            if not math.isfinite(sums[0]):
                raise TensorcutError(
                    f"training diverged at epoch {epoch + 1} (loss is {sums[0]}); lower the "
                    "learning rate"
                )
            tot += sums[0]
            n += int(round(sums[1]))
            correct += int(round(sums[2]))
            bar.set_postfix(loss=f"{tot / max(n, 1):.3f}")
        if ctx.enabled and not train_step.syncs_ranks:
            # BatchNorm running statistics drift per rank within an epoch: take rank 0's
            tdist.broadcast_module(model, buffers_only=True)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": tot / max(n, 1),
            "train_top1": correct / max(n, 1),
            "lr": opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        if val_loader is not None:
            v = evaluate(model, val_loader, dev, distributed=ctx.enabled)
            row.update(val_loss=v["loss"], val_top1=v["top1"], val_top5=v["top5"])
            if cfg.scheduler == "plateau":
                sched.step(v["loss"])
        elif cfg.scheduler == "plateau":
            sched.step(row["train_loss"])
        fs.epoch = epoch + 1
        for hook in hooks:
            if isinstance(hook, Callback):
                hook.on_epoch_end(row, fs)
            else:
                hook(row, model)
        fs.history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if progress and ctx.is_main:
            train_step.report(row)
        for cb in objects:
            cb.after_epoch(row, fs)
        if ctx.enabled:  # one rank asking is enough: every rank leaves the loop together
            fs.stop = tdist.all_reduce_sum([1.0 if fs.stop else 0.0], dev)[0] > 0
        if fs.stop:
            break
    for cb in objects:
        cb.on_fit_end(fs)
    _revert_sync_batchnorm(model, swapped)
    model.eval()
    return fs.history


def _callbacks(
    given: Sequence[Callback | EpochCallback],
    cfg: FitConfig,
    out_dir: str | Path | None,
    meta: dict[str, Any] | None,
    resume: bool,
) -> list[Callback | EpochCallback]:
    """The run's callbacks in the order they run: the given ones, then early stopping
    (``patience``) and the checkpoint (``out_dir``); stably by ``order`` (a checkpoint last).

    Checked before anything trains or moves.
    """
    hooks: list[Callback | EpochCallback] = []
    for cb in given:
        if not (isinstance(cb, Callback) or callable(cb)):
            raise TensorcutError(
                f"callbacks take Callback objects or functions f(row, model); got "
                f"{type(cb).__name__}"
            )
        hooks.append(cb)
    if out_dir:
        if any(isinstance(cb, Checkpoint) for cb in given):
            raise TensorcutError(
                "give out_dir= or a Checkpoint callback, not both (they would write and resume "
                "twice)"
            )
        hooks.append(Checkpoint(out_dir, meta, resume=resume))
    elif resume:
        raise TensorcutError("--resume needs the output directory of the run to continue")
    if cfg.patience is not None:
        hooks.append(EarlyStopping(cfg.patience))
    return sorted(hooks, key=lambda cb: cb.order if isinstance(cb, Callback) else 0)


def _wrap(
    model: nn.Module, cfg: FitConfig, ctx: tdist.DistContext, dev: torch.device
) -> tuple[nn.Module, dict[str, type[nn.Module]]]:
    """DistributedDataParallel around ``model`` for several processes (``model`` itself otherwise).

    Returns the module to call and the BatchNorm layers swapped for SyncBatchNorm (name -> class).
    """
    if not ctx.enabled:
        return model, {}
    swapped: dict[str, type[nn.Module]] = {}
    if cfg.sync_batchnorm:
        if dev.type != "cuda":
            raise TensorcutError(
                "sync_batchnorm needs CUDA (PyTorch's SyncBatchNorm is GPU-only); on CPU each "
                "process normalises its own share of the batch"
            )
        for name, m in list(model.named_modules()):
            if (
                name
                and isinstance(m, nn.modules.batchnorm._BatchNorm)
                and not isinstance(m, nn.SyncBatchNorm)
            ):
                swapped[name] = type(m)
                model.set_submodule(name, nn.SyncBatchNorm.convert_sync_batchnorm(m))
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return ddp, swapped


def _revert_sync_batchnorm(model: nn.Module, swapped: dict[str, type[nn.Module]]) -> None:
    """Put back the original BatchNorm classes (same state dict), so the model runs without a
    process group."""
    for name, cls in swapped.items():
        m = model.get_submodule(name)
        bn = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        bn.load_state_dict(m.state_dict())
        model.set_submodule(name, bn.to(next(m.buffers(), torch.empty(0)).device))
