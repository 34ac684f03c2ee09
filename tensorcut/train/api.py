"""The `train` and `evaluate` verbs as Python functions (the CLI wraps these)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tensorcut import data as tdata
from tensorcut import distributed as tdist
from tensorcut import io as tio
from tensorcut import models
from tensorcut.errors import TensorcutError
from tensorcut.train.loop import FitConfig, evaluate as evaluate_loader, fit, resolve_device, set_seed

__all__ = ["check_dataset_fits", "train", "evaluate", "model_kwargs_for"]


def model_kwargs_for(dataset: str, width: float = 1.0) -> dict[str, Any]:
    """Model arguments that fit data set ``dataset`` (classes, channels, input size)."""
    info = tdata.dataset_info(dataset)
    return {"num_classes": info.num_classes, "in_channels": info.in_channels, "width": width, "input_size": info.image_size}


def check_dataset_fits(meta: dict[str, Any], ds: tdata.ImageDataset, name: str) -> None:
    """Refuse, in one line, images the checkpoint's model cannot take (channel count; vanilla-cnn's input size)."""
    m = meta.get("model") or {}
    kw = m.get("kwargs") or {}
    c, h, _ = ds.info_shape
    if kw.get("in_channels", c) != c:
        raise TensorcutError(f"{name} images have {c} channels but the model expects {kw['in_channels']}; "
                             "use the data set it was trained for")
    if m.get("name") == "vanilla-cnn" and kw.get("input_size", h) != h:
        raise TensorcutError(f"{name} images are {h} px but this vanilla-cnn was built for {kw['input_size']} px; "
                             "use the data set it was trained for")


def train(
    model: str,
    dataset: str,
    out: str | Path,
    *,
    epochs: int = 10,
    width: float = 1.0,
    batch_size: int = 128,
    config: FitConfig | None = None,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    subset: int | None = None,
    augment: bool = False,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
) -> tio.Checkpoint:
    """Train zoo model ``model`` on ``dataset``; checkpoint every epoch into ``out``; test at the end.

    Refuses to overwrite an existing checkpoint unless ``resume`` is set. Under
    ``torchrun --nproc_per_node=N`` the run is data-parallel (DDP, gloo on CPU, nccl on
    CUDA): ``batch_size`` stays the global batch, metrics are reduced over all ranks, and
    rank 0 alone writes ``out``.
    """
    out = Path(out)
    if (out / tio.META).exists() and not resume:
        raise TensorcutError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    cfg = config or FitConfig(epochs=epochs)
    if config is not None and epochs != cfg.epochs:
        cfg.epochs = epochs
    kwargs = model_kwargs_for(dataset, width)
    set_seed(cfg.seed)  # initial weights follow --seed (and are the same on every rank)
    net = models.create(model, **kwargs)
    tr = tdata.load_dataset(dataset, "train", data_dir=data_dir, val_fraction=val_fraction, seed=cfg.seed,
                            subset=subset, augment=augment)
    va = tdata.load_dataset(dataset, "val", data_dir=data_dir, val_fraction=val_fraction, seed=cfg.seed)
    te = tdata.load_dataset(dataset, "test", data_dir=data_dir, val_fraction=val_fraction, seed=cfg.seed)
    meta: dict[str, Any] = {
        "model": {"name": model, "kwargs": kwargs},
        "dataset": {"name": dataset, "val_fraction": val_fraction, "seed": cfg.seed,
                    "data_dir": str(data_dir) if data_dir else None, "subset": subset},
        "recipe": {"epochs": cfg.epochs, "optimizer": cfg.optimizer, "lr": cfg.lr, "scheduler": cfg.scheduler,
                   "batch_size": batch_size, "augment": augment, "patience": cfg.patience},
    }
    with tdist.session(resolve_device(device)) as ctx:
        dev = ctx.device
        history = fit(net, tdata.make_loader(tr, batch_size, shuffle=True, seed=cfg.seed), tdata.make_loader(va, 512),
                      cfg, device=dev, out_dir=out, meta=meta, resume=resume, progress=progress)
        metrics = evaluate_loader(net, tdata.make_loader(te, 512), dev)
        meta.update(history=history, epoch=len(history), metrics={"test": metrics})
        tdist.run_on_main(lambda: tio.save(net, out, meta))
        tdist.barrier()
    return tio.Checkpoint(model=net.eval(), meta=meta)


def evaluate(
    checkpoint: str | Path | nn.Module,
    dataset: str | None = None,
    split: str = "test",
    *,
    data_dir: str | Path | None = None,
    batch_size: int = 512,
    subset: int | None = None,
    device: str = "auto",
    meta: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 of a checkpoint directory (or module) on ``split`` of ``dataset``.

    The data set defaults to the one the checkpoint was trained on, with the same
    validation hold-out. Under ``torchrun`` each rank evaluates a share and the metrics are reduced.
    """
    if isinstance(checkpoint, nn.Module):
        net, meta = checkpoint, meta or {}
    else:
        ck = tio.load_checkpoint(checkpoint)
        net, meta = ck.model, ck.meta
    ds_meta = meta.get("dataset") or {}
    name = dataset or ds_meta.get("name")
    if not name:
        raise TensorcutError("no data set given and the checkpoint does not name one; pass --dataset")
    if data_dir is None and name == ds_meta.get("name"):
        data_dir = ds_meta.get("data_dir")
    ds = tdata.load_dataset(name, split, data_dir=data_dir, val_fraction=ds_meta.get("val_fraction", 0.1),
                            seed=ds_meta.get("seed", 0), subset=subset)
    check_dataset_fits(meta, ds, name)
    with tdist.session(resolve_device(device)) as ctx:
        net.to(ctx.device)
        return evaluate_loader(net, tdata.make_loader(ds, batch_size), ctx.device)
