"""The `train` and `evaluate` verbs on checkpoints as Python functions (the CLI wraps these)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from tensorcut import data as tdata
from tensorcut import distributed as tdist
from tensorcut import models
from tensorcut.checkpoint import CheckpointMeta, DatasetSpec, Lineage, ModelSpec, Recipe
from tensorcut.checkpoint import io as tio
from tensorcut.errors import TensorcutError
from tensorcut.train.config import FitConfig, check_numbers
from tensorcut.train.loop import evaluate as evaluate_loader
from tensorcut.train.loop import fit, resolve_device, set_seed

__all__ = [
    "check_dataset_fits",
    "check_input_size",
    "check_model_size",
    "check_numbers",
    "check_resume_recipe",
    "evaluate_checkpoint",
    "model_kwargs_for",
    "recorded_recipe",
    "resume_config",
    "train_checkpoint",
]


def model_kwargs_for(dataset: str, width: float = 1.0) -> dict[str, Any]:
    """Model arguments that fit data set ``dataset`` (classes, channels, input size)."""
    info = tdata.dataset_info(dataset)
    return {
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "width": width,
        "input_size": info.image_size,
    }


def check_dataset_fits(
    model: ModelSpec | CheckpointMeta | dict[str, Any] | None, ds: tdata.ImageDataset, name: str
) -> None:
    """Refuse, in one line, images the checkpoint's model cannot take (channel count; vanilla-cnn's
    input size).

    Args:
        model: the checkpoint's model (its :class:`~tensorcut.checkpoint.ModelSpec`, its typed
            metadata, or the ``meta.json`` object); None or metadata naming no model: nothing
            to refuse.
        ds: the images.
        name: the data set's name, for the message.

    Raises:
        TensorcutError: the images do not fit the model.

    Example:
        >>> ds = tdata.load_dataset("digits", "val")
        >>> check_dataset_fits(ModelSpec("vanilla-cnn", {"in_channels": 1}), ds, "digits")
    """
    if isinstance(model, CheckpointMeta):
        model = model.model
    elif isinstance(model, dict):
        model = ModelSpec.from_meta(model) if "model" in model else None
    if model is None:
        return
    kw = model.kwargs
    c, h, _ = ds.info_shape
    if kw.get("in_channels", c) != c:
        raise TensorcutError(
            f"{name} images have {c} channels but the model expects {kw['in_channels']}; "
            "use the data set it was trained for"
        )
    if model.name == "vanilla-cnn" and kw.get("input_size", h) != h:
        raise TensorcutError(
            f"{name} images are {h} px but this vanilla-cnn was built for {kw['input_size']} px; "
            "use the data set it was trained for"
        )


def check_model_size(name: str, kwargs: dict[str, Any], *, factor: float = 1.0) -> int:
    """Parameter count of zoo model ``name`` with ``kwargs``, refused in one line if it cannot fit
    in memory.

    The model is built on the ``meta`` device (no memory); ``factor`` is how many float32
    copies of the weights the job holds (weights, gradients, optimiser state).
    """
    check_numbers(
        **{k: kwargs.get(k) for k in ("width", "input_size", "in_channels", "num_classes")}
    )
    import torch

    try:
        with torch.device("meta"):
            net = models.create(name, **kwargs)
    except TensorcutError:
        raise
    except (RuntimeError, ValueError) as e:
        raise TensorcutError(
            f"cannot build {name} with {kwargs}: {str(e).splitlines()[0][:160]}"
        ) from None
    n = sum(p.numel() for p in net.parameters())
    need = 4 * n * factor
    have = _memory_bytes()
    if have is not None and need > have:
        raise TensorcutError(
            f"{name} at width {kwargs.get('width', 1.0):g} and input {kwargs.get('input_size')} "
            "px has "
            f"{n:,} parameters ({need / 2**30:,.1f} GiB), more than this machine's memory "
            f"({have / 2**30:,.1f} GiB); use a smaller --width"
        )
    return n


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_input_size(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """Refuse, in one line, an input so large that one image's activations cannot be held in memory.

    The forward pass runs on a ``meta``-device copy (shapes only, no memory).
    """
    import copy

    import torch

    c, h, w = input_shape
    check_numbers(input_size=min(h, w), in_channels=c)
    total = 0

    def hook(_m: nn.Module, _i: Any, o: Any) -> None:
        nonlocal total
        if isinstance(o, torch.Tensor):
            total += o.numel()

    try:
        meta_model = copy.deepcopy(model).to("meta").eval()
    except (RuntimeError, NotImplementedError):
        return  # cannot be moved to meta: let the real run speak
    handles = [
        m.register_forward_hook(hook) for m in meta_model.modules() if not list(m.children())
    ]
    try:
        with torch.no_grad():
            meta_model(torch.empty(1, c, h, w, device="meta"))
    except (RuntimeError, ValueError, NotImplementedError) as e:
        raise TensorcutError(
            f"the model cannot take a {c}x{h}x{w} input: {str(e).splitlines()[0][:160]}"
        ) from None
    finally:
        for hd in handles:
            hd.remove()
    have = _memory_bytes()
    if have is not None and 4 * total > have:
        raise TensorcutError(
            f"a {c}x{h}x{w} input needs {4 * total / 2**30:,.1f} GiB of activations per image, "
            "more than "
            f"this machine's memory ({have / 2**30:,.1f} GiB); use a smaller --input-size"
        )


#: Recipe entries a resumed run must keep (its optimiser and scheduler state are made for them).
RESUME_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "scheduler")


def recorded_recipe(out: str | Path) -> Recipe | None:
    """The training recipe recorded in checkpoint ``out``.

    Args:
        out: the checkpoint directory.

    Returns:
        Its :class:`~tensorcut.checkpoint.Recipe`; None when there is no ``meta.json``, it
        cannot be read (the loader reports that in its own words) or it records no recipe.

    Raises:
        TensorcutError: a recorded entry of the wrong type (one line naming it).

    Example:
        >>> recorded_recipe("runs/dense").lr  # doctest: +SKIP
        0.001
    """
    path = Path(out) / tio.META
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Lineage.from_meta(doc, path).recipe if isinstance(doc, dict) else None


def resume_config(out: str | Path, base: FitConfig | None = None) -> FitConfig:
    """The recipe a resumed run continues with: ``base`` with the optimiser, lr, momentum, weight
    decay and scheduler recorded in ``out`` (:data:`RESUME_KEYS`; the restored optimiser and
    scheduler state are made for them).

    Args:
        out: the checkpoint directory to resume.
        base: everything else (default: ``FitConfig()``); not changed.

    Returns:
        A new, validated :class:`FitConfig` (``base``'s values where nothing is recorded).

    Raises:
        TensorcutError: a recorded value the recipe cannot take.

    Example:
        >>> resume_config("runs/dense", FitConfig(epochs=20)).lr  # doctest: +SKIP
        0.05
    """
    base = base or FitConfig()
    rec = recorded_recipe(out)
    if rec is None:
        return dataclasses.replace(base)
    kept = {k: getattr(rec, k) for k in RESUME_KEYS if getattr(rec, k) is not None}
    return dataclasses.replace(base, **kept)


def check_resume_recipe(out: Path, recipe: FitConfig | dict[str, Any]) -> None:
    """Refuse ``--resume`` with a recipe other than the recorded one: the restored optimiser state
    would silently keep training at the old rate (or not fit another optimiser at all).

    Args:
        out: the checkpoint directory to resume.
        recipe: the run's recipe (a :class:`FitConfig`, or the ``recipe`` entry it records).

    Raises:
        TensorcutError: one of :data:`RESUME_KEYS` differs from the recorded value.

    Example:
        >>> check_resume_recipe(Path("runs/dense"), resume_config("runs/dense"))  # doctest: +SKIP
    """
    old = recorded_recipe(out)
    if old is None:
        return
    new = recipe if isinstance(recipe, dict) else {k: getattr(recipe, k) for k in RESUME_KEYS}
    changed = [
        f"--{k.replace('_', '-')} {getattr(old, k)} -> {new[k]}"
        for k in RESUME_KEYS
        if getattr(old, k) is not None and k in new and getattr(old, k) != new[k]
    ]
    if changed:
        raise TensorcutError(
            f"--resume continues {out} with its recorded recipe, but {', '.join(changed)}; "
            "drop those options to resume, or train into a new --out"
        )


def train_checkpoint(
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
    """Train zoo model ``model`` on ``dataset``; checkpoint every epoch into ``out``; test at the
    end.

    Refuses to overwrite an existing checkpoint unless ``resume`` is set. A resumed run keeps
    the recorded optimiser, lr, momentum, weight decay and scheduler: without ``config`` they
    are taken from ``out`` (:func:`resume_config`), a ``config`` that differs is refused
    (:func:`check_resume_recipe`). Under ``torchrun --nproc_per_node=N`` the run is
    data-parallel (DDP, gloo on CPU, nccl on CUDA): ``batch_size`` stays the global batch,
    metrics are reduced over all ranks, and rank 0 alone writes ``out``.

    Args:
        model: zoo model name.
        dataset: data-set name.
        out: the checkpoint directory.
        epochs: training epochs (overrides ``config.epochs``).
        width: channel width multiplier.
        batch_size: images per step (global under torchrun).
        config: the recipe (default ``FitConfig(epochs=epochs)``, or the recorded one on resume).
        data_dir, val_fraction, subset, augment: the data (folder, validation hold-out, a seeded
            training subset, augmentation).
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: continue the checkpoint in ``out``.
        progress: progress bars and one line per epoch.

    Returns:
        The trained checkpoint (model and metadata, with the test metrics).

    Raises:
        TensorcutError: bad input, a checkpoint in ``out`` without ``resume``, a resumed recipe
            that differs from the recorded one.

    Example:
        >>> ck = train_checkpoint("vanilla-cnn", "digits", "runs/d", epochs=1)  # doctest: +SKIP
    """
    out = Path(out)
    if out.is_file():
        raise TensorcutError(f"{out} is a file; give a directory path")
    if (out / tio.META).exists() and not resume:
        raise TensorcutError(
            f"{out} already holds a checkpoint; pass --resume to continue it or choose another "
            "--out"
        )
    resuming = resume and (out / tio.META).exists()
    if config is None:  # resumed: the recorded optimiser settings, not FitConfig's defaults
        cfg = resume_config(out, FitConfig(epochs=epochs)) if resuming else FitConfig(epochs=epochs)
    else:
        cfg = config if epochs == config.epochs else dataclasses.replace(config, epochs=epochs)
    check_numbers(
        batch_size=batch_size,
        epochs=cfg.epochs,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        width=width,
        val_fraction=val_fraction,
        subset=subset,
    )
    kwargs = model_kwargs_for(dataset, width)
    check_model_size(model, kwargs, factor=4.0)  # weights, gradients and two Adam moments
    recipe = {
        "epochs": cfg.epochs,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "scheduler": cfg.scheduler,
        "batch_size": batch_size,
        "augment": augment,
        "patience": cfg.patience,
    }
    if resuming:
        check_resume_recipe(out, recipe)
    set_seed(cfg.seed)  # initial weights follow --seed (and are the same on every rank)
    net = models.create(model, **kwargs)
    tr = tdata.load_dataset(
        dataset,
        "train",
        data_dir=data_dir,
        val_fraction=val_fraction,
        seed=cfg.seed,
        subset=subset,
        augment=augment,
    )
    va = tdata.load_dataset(
        dataset, "val", data_dir=data_dir, val_fraction=val_fraction, seed=cfg.seed
    )
    te = tdata.load_dataset(
        dataset, "test", data_dir=data_dir, val_fraction=val_fraction, seed=cfg.seed
    )
    meta: dict[str, Any] = {
        "model": {"name": model, "kwargs": kwargs},
        "dataset": DatasetSpec(
            name=dataset,
            data_dir=str(data_dir) if data_dir else None,
            val_fraction=val_fraction,
            seed=cfg.seed,
            subset=subset,
        ).to_dict(),
        "recipe": recipe,
    }
    with tdist.session(resolve_device(device)) as ctx:
        dev = ctx.device
        history = fit(
            net,
            tdata.make_loader(tr, batch_size, shuffle=True, seed=cfg.seed),
            tdata.make_loader(va, 512),
            cfg,
            device=dev,
            out_dir=out,
            meta=meta,
            resume=resume,
            progress=progress,
        )
        metrics = evaluate_loader(net, tdata.make_loader(te, 512), dev)
        meta.update(history=history, epoch=len(history), metrics={"test": metrics})
        tdist.run_on_main(lambda: tio.save(net, out, meta))
        tdist.barrier()
    return tio.Checkpoint(model=net.eval(), meta=meta)


def evaluate_checkpoint(
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
    spec = DatasetSpec.from_meta(meta).resolve(dataset, data_dir)
    ds = spec.load(
        split,
        subset=subset,
        missing="no data set given and the checkpoint does not name one; pass --dataset",
    )
    check_dataset_fits(meta, ds, str(spec.name))
    with tdist.session(resolve_device(device)) as ctx:
        net.to(ctx.device)
        return evaluate_loader(net, tdata.make_loader(ds, batch_size), ctx.device)
