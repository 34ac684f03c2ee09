"""`tensorcut train --method tdlrt`: rank-adaptive Tucker training of a zoo model, checkpointed.

The command-line verb is a thin wrapper over :func:`train_tdlrt_checkpoint`, which loads the
data as the dense ``train`` verb does, trains with :func:`tensorcut.train.tdlrt.train_tdlrt`
(from scratch, or from a dense / Tucker-compressed checkpoint) and writes an ordinary
checkpoint after every epoch. Under ``torchrun --nproc_per_node=N -m tensorcut train --method
tdlrt ...`` the processes train data-parallel (``--batch-size`` is the global batch, see
:func:`tensorcut.train.tdlrt.train_tdlrt`) and rank 0 alone prints progress and writes the
checkpoint, atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensorcut import data as tdata
from tensorcut import distributed as tdist
from tensorcut.checkpoint import DatasetSpec
from tensorcut.checkpoint import io as tio
from tensorcut.errors import TensorcutError
from tensorcut.train.config import Optimizer, Scheduler

__all__ = ["train_tdlrt_checkpoint"]


def train_tdlrt_checkpoint(
    model: str | None,
    dataset: str,
    out: str | Path,
    *,
    tau: float,
    init_rank: int | None = None,
    rmin: int = 2,
    rmax: int | None = None,
    init_from: str | Path | None = None,
    epochs: int = 10,
    width: float = 1.0,
    batch_size: int = 128,
    optimizer: Optimizer = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    scheduler: Scheduler = "cosine",
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    subset: int | None = None,
    augment: bool = False,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> tio.Checkpoint:
    """Train zoo model ``model`` (or the model in checkpoint ``init_from``) with TDLRT; save into
    ``out``.

    From scratch the Tucker layers start from random orthonormal factors (rank ``init_rank``,
    default half of each mode); with ``init_from`` every dense convolution is decomposed by
    HOSVD (full rank unless ``init_rank`` / ``rmax`` is smaller) and Tucker layers are kept.
    The test split is evaluated at the end; the checkpoint's ``tdlrt`` record
    (:class:`~tensorcut.checkpoint.TdlrtRecord`) holds the settings and the final ranks.
    """
    from tensorcut.train.loop import resolve_device

    out = Path(out)
    with tdist.session(resolve_device(device)) as ctx:
        return _train(
            model,
            dataset,
            out,
            ctx,
            tau=tau,
            init_rank=init_rank,
            rmin=rmin,
            rmax=rmax,
            init_from=init_from,
            epochs=epochs,
            width=width,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            scheduler=scheduler,
            data_dir=data_dir,
            val_fraction=val_fraction,
            subset=subset,
            augment=augment,
            seed=seed,
            progress=progress,
        )


def _train(
    model: str | None,
    dataset: str,
    out: Path,
    ctx: tdist.DistContext,
    *,
    tau: float,
    init_rank: int | None,
    rmin: int,
    rmax: int | None,
    init_from: str | Path | None,
    epochs: int,
    width: float,
    batch_size: int,
    optimizer: Optimizer,
    lr: float,
    momentum: float,
    weight_decay: float,
    scheduler: Scheduler,
    data_dir: str | Path | None,
    val_fraction: float,
    subset: int | None,
    augment: bool,
    seed: int,
    progress: bool,
) -> tio.Checkpoint:
    from tensorcut import models
    from tensorcut.train.api import model_kwargs_for
    from tensorcut.train.loop import evaluate, set_seed
    from tensorcut.train.tdlrt import rank_report, train_tdlrt

    def fresh() -> None:
        if (out / tio.META).exists():
            raise TensorcutError(
                f"{out} already holds a checkpoint; TDLRT runs cannot be resumed, choose another "
                "--out"
            )

    tdist.run_on_main(fresh)  # rank 0 decides, every rank stops
    set_seed(seed)  # the same initial model on every rank
    if init_from is not None:
        ck = tio.load_checkpoint(init_from)
        net, src = ck.model, ck.info.model
        name, kwargs = src.name, dict(src.kwargs)
        if model is not None and model != name:
            raise TensorcutError(
                f"--model {model} does not match the {name} in {init_from}; drop --model or fix it"
            )
    else:
        if model is None:
            raise TensorcutError(
                "name a zoo model with --model, or a checkpoint to start from with --init-from"
            )
        name, kwargs = model, model_kwargs_for(dataset, width)
        net = models.create(name, **kwargs)
    tr = tdata.load_dataset(
        dataset,
        "train",
        data_dir=data_dir,
        val_fraction=val_fraction,
        seed=seed,
        subset=subset,
        augment=augment,
    )
    va = tdata.load_dataset(dataset, "val", data_dir=data_dir, val_fraction=val_fraction, seed=seed)
    te = tdata.load_dataset(
        dataset, "test", data_dir=data_dir, val_fraction=val_fraction, seed=seed
    )
    settings: dict[str, Any] = {
        "tau": tau,
        "init_rank": init_rank,
        "rmin": rmin,
        "rmax": rmax,
        "init_from": str(init_from) if init_from is not None else None,
    }
    meta: dict[str, Any] = {
        "model": {"name": name, "kwargs": kwargs},
        "dataset": DatasetSpec(
            name=dataset,
            data_dir=str(data_dir) if data_dir else None,
            val_fraction=val_fraction,
            seed=seed,
            subset=subset,
        ).to_dict(),
        "recipe": {
            "method": "tdlrt",
            "epochs": epochs,
            "optimizer": optimizer,
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "scheduler": scheduler,
            "batch_size": batch_size,
            "augment": augment,
        },
        "tdlrt": settings,
    }
    history: list[dict[str, Any]] = []

    def on_epoch(row: dict[str, Any]) -> None:  # train_tdlrt prints the epoch's line itself
        history.append(row)
        snapshot = {**meta, "history": history, "epoch": row["epoch"]}
        tdist.run_on_main(lambda: tio.save(net, out, snapshot))

    dev = ctx.device
    train_tdlrt(
        net,
        tdata.make_loader(tr, batch_size, shuffle=True, seed=seed),
        tdata.make_loader(va, 512),
        tau=tau,
        init_rank=init_rank,
        rmin=rmin,
        rmax=rmax,
        epochs=epochs,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        scheduler=scheduler,
        from_pretrained=init_from is not None,
        device=dev,
        log=on_epoch,
        seed=seed,
        progress=progress,
    )
    metrics = evaluate(
        net, tdata.make_loader(te, 512), dev
    )  # reduced over the ranks under torchrun
    rep = rank_report(net)
    settings.update(
        final_ranks={k: v["ranks"] for k, v in rep["layers"].items()},
        conv_cr=rep["conv_cr"],
        conv_compression_pct=rep["conv_compression_pct"],
    )
    meta.update(history=history, epoch=len(history), metrics={"test": metrics})
    tdist.run_on_main(lambda: tio.save(net, out, meta))
    tdist.barrier()
    return tio.Checkpoint(model=net.eval(), meta=meta)
