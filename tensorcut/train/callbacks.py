"""What :func:`~tensorcut.train.loop.fit` does around its epochs: checkpoints
(:class:`Checkpoint`), early stopping (:class:`EarlyStopping`) and the small protocol they
share (:class:`Callback`, :class:`FitState`).

``fit(out_dir=..., resume=...)`` builds a :class:`Checkpoint` and ``FitConfig(patience=...)``
an :class:`EarlyStopping`; either can also be passed in ``callbacks=[...]``, beside plain
functions ``f(row, model)``.

Hooks, per run::

    on_fit_start(fit)                 after the model, optimiser and scheduler are built
    per epoch:  on_epoch_end(row, fit)   after validation; may add fields to the row
                (the row is recorded, handed to on_epoch and printed)
                after_epoch(row, fit)    decide (fit.stop = True ends training), save
    on_fit_end(fit)                   after the last epoch

Callbacks run in the order given, by ascending :attr:`Callback.order`: a :class:`Checkpoint`
runs after every other callback, so it saves what they decided (and restores their state
after they reset it). A callback's :meth:`~Callback.state_dict` is saved in the checkpoint's
``train_state.pt`` and handed back to :meth:`~Callback.load_state_dict` on resume.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import math
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from tensorcut import distributed as tdist
from tensorcut.errors import TensorcutError

if TYPE_CHECKING:
    from tensorcut.train.config import FitConfig
    from tensorcut.train.steps import TrainStep

__all__ = [
    "TRAIN_STATE",
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "FitState",
    "check_checkpoint_meta",
    "load_train_state",
]

#: the file of a checkpoint that holds what a resumed run needs beyond the weights
TRAIN_STATE = "train_state.pt"


@dataclass(eq=False)
class FitState:
    """What :func:`~tensorcut.train.loop.fit` shares with its callbacks, one object per run.

    Args:
        model: the network being trained (never the DistributedDataParallel wrapper).
        config: the run's :class:`~tensorcut.train.config.FitConfig`.
        step: the :class:`~tensorcut.train.steps.TrainStep` (its ``optimizer``,
            ``state_dict()``).
        ctx: the process group (``rank``, ``world_size``, ``is_main``; one process: disabled).
        device: where the model trains.
        scheduler: the learning-rate scheduler, or ``None``.
        history: one row per finished epoch (a resumed run's earlier epochs included).
        epoch: epochs finished so far.
        stop: set to ``True`` by a callback to end training after this epoch (under several
            processes every rank stops when any rank asks).
        callbacks: the run's :class:`Callback` objects, in the order they run.

    Example:
        >>> class StopAt(Callback):
        ...     def after_epoch(self, row, fit):
        ...         fit.stop = row["train_top1"] > 0.99
    """

    model: nn.Module
    config: FitConfig
    step: TrainStep
    ctx: tdist.DistContext
    device: torch.device
    scheduler: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    stop: bool = False
    callbacks: list[Callback] = field(default_factory=list)


class Callback:
    """Base class of :func:`~tensorcut.train.loop.fit`'s callbacks: every hook does nothing.

    Override the hooks you need (see the module docstring for when each runs); a callback
    with state that a resumed run needs returns it from :meth:`state_dict` (plain values and
    tensors: it is saved with ``torch.save`` and read back with ``weights_only=True``).

    Every process runs every callback under ``torchrun``; write files through
    :func:`tensorcut.distributed.run_on_main`.

    Example:
        >>> class LogLR(Callback):
        ...     def on_epoch_end(self, row, fit):
        ...         row["lr_x1000"] = 1000 * row["lr"]
        >>> tc.fit(model, train, val, tc.FitConfig(epochs=2), callbacks=[LogLR()])  # doctest: +SKIP
    """

    #: callbacks run by ascending ``order``, stably (a :class:`Checkpoint` runs last)
    order: ClassVar[int] = 0

    def on_fit_start(self, fit: FitState) -> None:
        """Before the first epoch (on resume: before the first epoch still to run)."""

    def on_epoch_end(self, row: dict[str, Any], fit: FitState) -> None:
        """After the epoch's validation, before the row is recorded; may add fields to ``row``."""

    def after_epoch(self, row: dict[str, Any], fit: FitState) -> None:
        """After the row is recorded and printed: decide (``fit.stop = True``) and save."""

    def on_fit_end(self, fit: FitState) -> None:
        """After the last epoch (also after an early stop)."""

    def state_dict(self) -> dict[str, Any] | None:
        """What a resumed run needs (``None``: nothing)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""


class EarlyStopping(Callback):
    """Stop when the monitored metric has not improved for ``patience`` epochs; restore the
    best weights.

    An epoch improves when its ``monitor`` value beats the best so far by more than
    ``min_delta`` (lower for ``mode="min"``, higher for ``"max"``). After ``patience`` epochs
    without improvement training stops and, with ``restore_best``, the weights of the best
    epoch are loaded back, before the checkpoint of that epoch is written; at the end of the
    run they are loaded back in any case. Rows without ``monitor`` (no validation loader)
    never count. ``FitConfig(patience=N)`` is ``EarlyStopping(N)``.

    The best weights are part of :meth:`state_dict`, so a resumed run restores the same
    weights an uninterrupted one would.

    Args:
        patience: epochs without improvement before stopping (an integer >= 1).
        monitor: the history-row field to watch (``"val_loss"``, ``"val_top1"``, ...).
        mode: ``"min"`` or ``"max"``.
        min_delta: the least change that counts as an improvement (>= 0).
        restore_best: load the best epoch's weights back when stopping and at the end.

    Raises:
        TensorcutError: a patience below 1, an unknown mode or a negative ``min_delta``.

    Example:
        >>> stop = EarlyStopping(3, monitor="val_top1", mode="max")
        >>> tc.fit(model, train, val, tc.FitConfig(epochs=50), callbacks=[stop])  # doctest: +SKIP
        >>> stop.stopped_epoch, stop.best_epoch  # doctest: +SKIP
    """

    def __init__(
        self,
        patience: int,
        *,
        monitor: str = "val_loss",
        mode: str = "min",
        min_delta: float = 1e-6,
        restore_best: bool = True,
    ) -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise TensorcutError(f"patience must be an integer >= 1, got {patience!r}")
        if mode not in ("min", "max"):
            raise TensorcutError(f"mode must be 'min' or 'max', got {mode!r}")
        if not (
            isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0
        ):
            raise TensorcutError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.patience, self.monitor, self.mode = patience, monitor, mode
        self.min_delta, self.restore_best = float(min_delta), bool(restore_best)
        self._reset()

    def _reset(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.bad_epochs = 0
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, fit: FitState) -> None:
        self._reset()

    def after_epoch(self, row: dict[str, Any], fit: FitState) -> None:
        value = row.get(self.monitor)
        if value is None:
            return
        v = float(value)
        if self.mode == "min":
            better = v < self.best - self.min_delta
        else:
            better = v > self.best + self.min_delta
        if better:
            self.best, self.bad_epochs, self.best_epoch = v, 0, int(row["epoch"])
            if self.restore_best:
                self.best_state = copy.deepcopy(fit.model.state_dict())
        else:
            self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            fit.stop = True
            self.stopped_epoch = int(row["epoch"])
            self._restore(fit.model)

    def on_fit_end(self, fit: FitState) -> None:
        self._restore(fit.model)

    def _restore(self, model: nn.Module) -> None:
        if self.restore_best and self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        best = self.best_state
        return {
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "best_epoch": self.best_epoch,
            "best_state": None
            if best is None
            else {k: v.detach().cpu().clone() for k, v in best.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best", self.best))
        self.bad_epochs = int(state.get("bad_epochs", 0))
        epoch = state.get("best_epoch")
        self.best_epoch = None if epoch is None else int(epoch)
        self.best_state = state.get("best_state")


class Checkpoint(Callback):
    """Write a checkpoint after every epoch; with ``resume``, continue from the one in
    ``out_dir``.

    After each epoch ``out_dir`` receives the weights and ``meta.json`` (:func:`tensorcut.save`,
    with ``meta`` plus ``history`` and ``epoch``) and then ``train_state.pt``: the weights again,
    the step's optimiser state, the scheduler, the gradient scaler, every callback's state,
    the history and each process's RNG state. Each file is written atomically; a kill between
    the two leaves a training state one epoch behind ``meta.json``, and resuming redoes that
    epoch. Only rank 0 writes under ``torchrun``. Resuming restores all of it, so the resumed
    run continues exactly as the uninterrupted one (same batches, same random draws; with
    another number of processes rank 0 continues the saved stream). Without a
    ``train_state.pt`` in ``out_dir`` a resumed run starts from scratch.

    Args:
        out_dir: the checkpoint directory.
        meta: the checkpoint metadata, naming the architecture
            (``{"model": {"name": ..., "kwargs": {...}}, ...}``), JSON-serialisable.
        resume: continue from ``out_dir``'s training state.

    Raises:
        TensorcutError: ``meta`` without the architecture or not JSON-serialisable (when built,
            before any training); on resume, a training state that is corrupt or does not fit
            the model and recipe.

    Example:
        >>> meta = {"model": {"name": "resnet20", "kwargs": {}}}
        >>> tc.fit(model, train, val, cfg, callbacks=[Checkpoint("runs/a", meta)])  # doctest: +SKIP
    """

    order = 1000

    def __init__(
        self, out_dir: str | Path, meta: dict[str, Any] | None, *, resume: bool = False
    ) -> None:
        check_checkpoint_meta(meta)
        assert meta is not None  # checked above
        self.out = Path(out_dir)
        self.meta = dict(meta)
        self.resume = bool(resume)

    def on_fit_start(self, fit: FitState) -> None:
        if self.resume and (self.out / TRAIN_STATE).exists():
            self._restore(fit)

    def after_epoch(self, row: dict[str, Any], fit: FitState) -> None:
        rngs = tdist.all_gather_object(torch.get_rng_state())  # every rank takes part
        scaler = getattr(fit.step, "scaler", None)
        state = {
            "optimizer": fit.step.state_dict(),
            "scheduler": fit.scheduler.state_dict() if fit.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "epoch": fit.epoch,
            "history": json.dumps(fit.history),
            "callbacks": {
                key: st
                for key, cb in _keyed(fit.callbacks)
                if cb is not self and (st := cb.state_dict()) is not None
            },
            "rng": rngs[0],
            "rng_ranks": rngs,
            "world_size": fit.ctx.world_size,
        }
        meta = dict(self.meta, history=fit.history, epoch=fit.epoch)
        tdist.run_on_main(functools.partial(_write, fit.model, self.out, meta, state))

    def _restore(self, fit: FitState) -> None:
        from tensorcut.checkpoint import io as tio

        path = self.out / TRAIN_STATE
        st = load_train_state(path, fit.device)
        scaler = getattr(fit.step, "scaler", None)
        try:
            if st.get("model") is not None:
                fit.model.load_state_dict(st["model"])
            else:  # states written before the weights were kept in train_state.pt
                fit.model.load_state_dict(
                    tio.load_checkpoint(self.out, map_location=fit.device).model.state_dict()
                )
            fit.step.load_state_dict(st["optimizer"])
            if fit.scheduler is not None and st.get("scheduler") is not None:
                fit.scheduler.load_state_dict(st["scheduler"])
            if st.get("scaler") and scaler is not None:
                scaler.load_state_dict(st["scaler"])
            fit.history = json.loads(st["history"])
            fit.epoch = int(st["epoch"])
            saved = st.get("callbacks")
            if saved is None:  # states written before early stopping was a callback
                saved = {
                    "EarlyStopping": {
                        "best": st.get("best_loss", math.inf),
                        "bad_epochs": st.get("bad_epochs", 0),
                    }
                }
            for key, cb in _keyed(fit.callbacks):
                if cb is not self and isinstance(saved.get(key), dict):
                    cb.load_state_dict(saved[key])
        except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
            raise TensorcutError(
                f"{path} does not fit this model and recipe ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:120]}); resume with the same settings, or delete it "
                "to start over"
            ) from None
        rngs = st.get("rng_ranks")
        if isinstance(rngs, list) and len(rngs) == fit.ctx.world_size:
            rng = rngs[fit.ctx.rank]
        else:  # another world size: rank 0 continues the saved stream, the others their seeds
            rng = st.get("rng") if fit.ctx.rank == 0 else None
        if isinstance(rng, torch.Tensor):
            torch.set_rng_state(rng.cpu())


def _keyed(callbacks: list[Callback]) -> list[tuple[str, Callback]]:
    """Each callback with its key in ``train_state.pt``: the class name, ``#k`` appended for the
    k-th further one of a class."""
    seen: dict[str, int] = {}
    out = []
    for cb in callbacks:
        name = type(cb).__name__
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append((name if k == 0 else f"{name}#{k}", cb))
    return out


def check_checkpoint_meta(meta: dict[str, Any] | None) -> None:
    """Refuse, before epoch 1, checkpoint metadata that :func:`tensorcut.save` would reject after
    it.

    Args:
        meta: the metadata a :class:`Checkpoint` writes.

    Raises:
        TensorcutError: ``meta`` does not name the architecture (its ``model`` entry, a
            :class:`~tensorcut.checkpoint.ModelSpec`) or is not JSON-serialisable.

    Example:
        >>> check_checkpoint_meta({"model": {"name": "resnet20", "kwargs": {}}})
    """
    from tensorcut.checkpoint import ModelSpec
    from tensorcut.checkpoint import io as tio

    ModelSpec.from_meta(
        meta if isinstance(meta, dict) else {},
        "fit(meta=...)",
        fix="pass the model's constructor arguments as a dict",
        missing=(
            "fit(out_dir=...) writes a checkpoint after every epoch and needs meta= naming the "
            "architecture, e.g. meta={'model': {'name': 'resnet20', 'kwargs': {...}}} (a registry "
            "name, or your class's name and reload with tensorcut.load(dir, model=YourNet()))"
        ),
    )
    try:
        json.dumps(meta, default=tio.json_default)
    except (TypeError, ValueError) as e:
        raise TensorcutError(
            f"fit(meta=...) is not JSON-serialisable ({e}); pass plain numbers, strings, lists "
            "and dicts"
        ) from None


def _write(model: nn.Module, out: Path, meta: dict[str, Any], state: dict[str, Any]) -> None:
    """Weights + meta.json, then train_state.pt (which carries its own copy of the weights).

    Each file is atomic. A kill between the two leaves a training state one epoch behind
    meta.json; resuming from it redoes that epoch, with the weights that belong to it.
    """
    from tensorcut.checkpoint import io as tio

    tio.save(model, out, meta)
    buf = io.BytesIO()
    torch.save(dict(state, model={k: v.detach().cpu() for k, v in model.state_dict().items()}), buf)
    tio.atomic_write_bytes(out / TRAIN_STATE, buf.getvalue())


def load_train_state(path: Path, device: torch.device) -> dict[str, Any]:
    """Read a ``train_state.pt`` with ``weights_only=True`` (nothing in it is executed).

    Args:
        path: the file.
        device: where its tensors go.

    Returns:
        The training state (``optimizer``, ``epoch``, ``history``, ...).

    Raises:
        TensorcutError: the file is corrupt or not a tensorcut training state (one line).

    Example:
        >>> st = load_train_state(Path("runs/a/train_state.pt"), torch.device("cpu"))
    """
    try:
        with (
            warnings.catch_warnings()
        ):  # torch's own warnings about odd pickle protocols: the error says it all
            warnings.simplefilter("ignore")
            st = torch.load(path, map_location=device, weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        struct.error,
        AttributeError,
        TypeError,
        KeyError,
        IndexError,
        LookupError,
        OverflowError,
        MemoryError,
    ) as e:
        raise TensorcutError(
            f"{path} is corrupt or not a tensorcut training state ({type(e).__name__}); it was not "
            "executed; delete it to restart training from scratch"
        ) from None
    if not isinstance(st, dict) or "optimizer" not in st or "epoch" not in st:
        raise TensorcutError(
            f"{path} is not a tensorcut training state; delete it to restart training from scratch"
        )
    return st
