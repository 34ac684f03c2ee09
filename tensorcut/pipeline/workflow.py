"""Checkpoint-level verbs: compress a checkpoint, fine-tune it, export it.

These are the Python functions behind ``tensorcut compress``, ``finetune`` and ``export``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from tensorcut import data as tdata
from tensorcut.checkpoint import (
    BatchNormRecord,
    CheckpointMeta,
    DatasetSpec,
    EpochRecord,
    FinetuneRecord,
    MatchRecord,
    Metrics,
    ModelSpec,
    Parent,
    Score,
)
from tensorcut.checkpoint import io as tio
from tensorcut.compression import CompressConfig, Plan, apply, plan
from tensorcut.compression.measured import DropTable
from tensorcut.errors import TensorcutError
from tensorcut.train.loop import FitConfig, fit, resolve_device
from tensorcut.train.loop import evaluate as evaluate_loader
from tensorcut.train.recipes import FINETUNE_RECIPE, RECIPES, RSDTR_RECIPE

if TYPE_CHECKING:
    from tensorcut.export import Export

__all__ = [
    "DEFAULT_BN_IMAGES",
    "DEFAULT_MATCH_LR",
    "FINETUNE_RECIPE",
    "RECIPES",
    "RSDTR_RECIPE",
    "bn_recalibration_line",
    "check_output_dir",
    "compress_checkpoint",
    "export_checkpoint",
    "export_checkpoint_checked",
    "finetune_checkpoint",
    "input_shape_of",
    "load_drops",
    "load_sensitivity",
    "match_line",
]


def input_shape_of(meta: dict[str, Any] | CheckpointMeta) -> tuple[int, int, int]:
    """(C, H, W) of the model's input, from checkpoint metadata (see
    :meth:`ModelSpec.input_shape`)."""
    spec = meta.model if isinstance(meta, CheckpointMeta) else ModelSpec.from_meta(meta)
    return spec.input_shape()


_SENSITIVITY_SQL = """
SELECT r.layer, r.norm_loss_pct, r.top1, b.top1 FROM results r
JOIN results b ON b.fingerprint = r.fingerprint AND b.data = r.data AND b.split = r.split
    AND b.kind = 'baseline'
WHERE r.kind = 'single' AND r.method = 'svd'
"""


def load_sensitivity(path: str | Path) -> dict[str, float]:
    """Per-layer sensitivity from a truncation-study results file (SQLite) or a JSON ``{layer:
    weight}``.

    From a sweep, a layer's sensitivity is its mean top-1 drop per unit of norm loss over
    single-layer truncations (1 + 100 * drop / norm-loss fraction), so layers whose
    truncation costs accuracy fastest weigh most. Every weight is >= 1.
    """
    p = Path(path)
    if not p.exists():
        raise TensorcutError(f"sensitivity file {p} does not exist; run `tensorcut analyze` first")
    if p.suffix == ".json":
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            sens = {str(k): float(v) for k, v in d.items()}
        except (
            AttributeError,
            TypeError,
            ValueError,
        ) as e:  # ValueError: bad JSON, not UTF-8, not a number
            raise TensorcutError(
                f"{p} is not a JSON object of layer -> sensitivity ({str(e).splitlines()[0][:100]})"
            ) from None
        bad = {k: v for k, v in sens.items() if not (v >= 0 and v < float("inf"))}
        if bad:
            k, v = next(iter(bad.items()))
            raise TensorcutError(f"{p}: sensitivities must be finite and >= 0, got {k}: {v:g}")
        return sens
    try:
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            rows = con.execute(_SENSITIVITY_SQL).fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise TensorcutError(f"{p} is not a readable results database ({e})") from None
    acc: dict[str, list[float]] = {}
    for layer, norm_loss, top1, base in rows:
        if norm_loss is None or top1 is None or base is None or norm_loss <= 0:
            continue
        acc.setdefault(layer, []).append(
            max(0.0, float(base) - float(top1)) / (float(norm_loss) / 100.0)
        )
    if not acc:
        raise TensorcutError(
            f"{p} holds no single-layer truncation rows to derive sensitivity from"
        )
    return {k: 1.0 + 100.0 * sum(v) / len(v) for k, v in acc.items()}


#: Files a compressed or fine-tuned checkpoint directory is made of (``check_output_dir``
#: protects them).
CHECKPOINT_FILES = (tio.WEIGHTS, tio.META, "plan.json")


def check_output_dir(
    out: str | Path, *, force: bool = False, unfinished_from: str | Path | None = None
) -> None:
    """Refuse, in one line, an output directory that already holds a checkpoint (unless ``force``)
    or is a file.

    ``unfinished_from``: a checkpoint left by a killed ``compress`` of this same source (its
    ``plan.json``, written last, missing) is no finished output, so writing it again is allowed.
    """
    out = Path(out)
    if out.is_file():
        raise TensorcutError(f"{out} is a file; give a directory path")
    if force or not any((out / n).exists() for n in CHECKPOINT_FILES):
        return
    if unfinished_from is not None and not (out / "plan.json").exists():
        try:
            left = CheckpointMeta.from_meta(json.loads((out / tio.META).read_text())).lineage
        except (OSError, ValueError):  # unreadable or not a checkpoint's: a TensorcutError too
            left = None
        parent = left.parent if left is not None else None
        if parent is not None and Path(parent.path).resolve() == Path(unfinished_from).resolve():
            return
    raise TensorcutError(
        f"{out} already holds a checkpoint; pass --force to replace it or choose another --out"
    )


#: Adam's learning rate of layer matching (``compress --match-lr``), as in the pruning-frontier
#: benchmark's ``-match`` arms
DEFAULT_MATCH_LR = 1e-3


def load_drops(
    path: str | Path,
    model: nn.Module | None = None,
    config: CompressConfig | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> DropTable:
    """A drop table saved by :meth:`DropTable.save` (JSON only, never unpickled), checked against
    the model and config it will plan.

    Args:
        path: the JSON file (e.g. a run's ``study/drops.json`` or a compressed checkpoint's
            ``drops.json``).
        model: the dense model the plan is for: every measured layer must be a Conv2d of it.
        config: the compression config: its method (unless ``auto``) must have been measured.
        input_shape: (C, H, W) the model is planned for: the table must have been measured at it.

    Returns:
        The :class:`~tensorcut.compression.measured.DropTable`.

    Raises:
        TensorcutError: one line naming the file: missing, not JSON, not a drop table, or
            measured on another model, input size or method.

    Example:
        >>> table = load_drops("runs/r10/study/drops.json")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise TensorcutError(f"--drops {p} is not a file; give the drops.json of a measurement")
    table = DropTable.load(p)
    if input_shape is not None and tuple(table.input_shape) != tuple(input_shape):
        raise TensorcutError(
            f"--drops {p} was measured at input {tuple(table.input_shape)}, this model takes "
            f"{tuple(input_shape)}; measure this model (drop --drops)"
        )
    if config is not None and config.method != "auto" and config.method not in table.methods:
        raise TensorcutError(
            f"--drops {p} measured {', '.join(table.methods)}, not {config.method}; use "
            f"--method {table.methods[0]} or measure again (drop --drops)"
        )
    if model is not None:
        convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        foreign = [ld.name for ld in table.layers if ld.name not in convs]
        if foreign:
            raise TensorcutError(
                f"--drops {p} names {len(foreign)} layer(s) this model lacks (e.g. "
                f"{foreign[0]!r}); it was measured on another model, measure this one (drop "
                "--drops)"
            )
    return table


def _check_recovery(
    config: CompressConfig,
    drops: DropTable | str | Path | None,
    bn_images: int | None,
    bn_loader: Any,
    match_epochs: int,
    match_lr: float,
) -> None:
    """Refuse, in one line and before any work, recovery and allocation settings that cannot
    run."""
    import math

    if bn_images is not None and bn_images < 0:
        raise TensorcutError(f"--bn-images must be >= 0, got {bn_images}")
    if isinstance(match_epochs, bool) or not isinstance(match_epochs, int) or match_epochs < 0:
        raise TensorcutError(f"--match-epochs must be an integer >= 0, got {match_epochs!r}")
    if (
        isinstance(match_lr, bool)
        or not isinstance(match_lr, (int, float))
        or not (math.isfinite(match_lr) and match_lr > 0)
    ):
        raise TensorcutError(f"--match-lr must be a finite number > 0, got {match_lr!r}")
    measured = config.allocation == "measured"
    if drops is not None and not measured:
        raise TensorcutError(
            "--drops is read by --allocation measured; add --allocation measured (with --budget) "
            "or drop --drops"
        )
    if drops is not None and not isinstance(drops, (DropTable, str, Path)):
        raise TensorcutError(
            f"drops must be a DropTable or the path of its JSON file, got {type(drops).__name__}"
        )
    no_images = bn_images == 0 and bn_loader is None
    if no_images and match_epochs > 0:
        raise TensorcutError(
            "--match-epochs fits the layers on the --bn-images calibration images, and re-"
            "estimates BatchNorm before and after; give --bn-images N > 0 (or leave its default)"
        )
    if no_images and measured and drops is None:
        raise TensorcutError(
            "--allocation measured measures each layer on the --bn-images calibration images; "
            "give --bn-images N > 0 (or leave its default), or --drops FILE"
        )


def compress_checkpoint(
    src: str | Path,
    out: str | Path,
    config: CompressConfig,
    *,
    layers: list[str] | None = None,
    sensitivity: str | Path | dict[str, float] | None = None,
    evaluate_split: str | None = None,
    progress: bool = True,
    precomputed: Plan | None = None,
    bn_images: int | None = 0,
    bn_loader: Any = None,
    drops: DropTable | str | Path | None = None,
    match_epochs: int = 0,
    match_lr: float = DEFAULT_MATCH_LR,
    force: bool = False,
) -> tuple[nn.Module, Plan, dict[str, Any]]:
    """Plan and apply ``config`` to checkpoint ``src``; save the compressed checkpoint and
    ``plan.json`` in ``out``.

    Order: plan (measuring the drops first for ``allocation="measured"`` without ``drops``) ->
    swap -> BatchNorm re-estimation -> layer matching -> BatchNorm re-estimation again (the order
    of the pruning-frontier benchmark's ``-match`` arms).

    Args:
        src: the (dense) checkpoint directory.
        out: where the compressed checkpoint goes (refused when it holds one, unless ``force``).
        config: what to factorize and how.
        layers: conv layer names to consider (default: the config's filter).
        sensitivity: a truncation-study results file, a JSON ``{layer: weight}`` or that dict,
            guiding a ``budget``.
        evaluate_split: evaluate the compressed model on ``"val"`` or ``"test"``.
        progress: show progress bars.
        precomputed: a plan already made for this checkpoint's model (applied as is).
        bn_images: > 0 re-estimates BatchNorm statistics of the compressed model on that many
            training images (seeded subset, no augmentation); ``None`` is the CLI's default:
            :data:`DEFAULT_BN_IMAGES` images when the model has BatchNorm layers and the data set
            can be loaded, else skipped with the reason; 0 keeps the trained statistics. These
            are also the calibration images of layer matching and of the measured drops.
        bn_loader: calibration batches ``(images, labels)`` to use instead of ``bn_images``.
        drops: for ``config.allocation == "measured"``: the measured per-layer drops, a
            :class:`DropTable` or the path of its JSON file (:func:`load_drops`); None measures
            them on the calibration images (saved as ``out/drops.json``, reusable).
        match_epochs: > 0 fits each factorized conv's output to its dense original's on the
            calibration images for that many passes
            (:func:`tensorcut.compression.recover.match_layers`), then re-estimates BatchNorm
            again; recorded as ``layer_matching``.
        match_lr: Adam's learning rate of layer matching.
        force: replace a checkpoint already in ``out``.

    Returns:
        ``(model, plan, meta)``: the compressed model, the plan applied and the ``meta.json``
        written (``bn_recalibration`` and ``layer_matching`` record what was done; ``plan.json``
        repeats them).

    Raises:
        TensorcutError: bad input, checked before the long work (one line).

    Example:
        >>> cfg = CompressConfig(method="tucker2", budget=0.5, budget_kind="macs",
        ...                      allocation="measured")
        >>> compress_checkpoint("runs/dense", "runs/x2", cfg, bn_images=None,
        ...                     match_epochs=3)  # doctest: +SKIP
    """
    _check_recovery(config, drops, bn_images, bn_loader, match_epochs, match_lr)
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise TensorcutError(
            "--out must differ from the source checkpoint; the dense model is kept"
        )
    check_output_dir(out, force=force, unfinished_from=src)
    ck = tio.load_checkpoint(src)
    shape = input_shape_of(ck.meta)
    sens = load_sensitivity(sensitivity) if isinstance(sensitivity, (str, Path)) else sensitivity
    if sens:
        convs = {n for n, m in ck.model.named_modules() if isinstance(m, nn.Conv2d)}
        foreign = sorted(set(sens) - convs)
        if foreign:
            raise TensorcutError(
                f"the sensitivity file names {len(foreign)} layer(s) this model lacks (e.g. "
                f"{foreign[0]!r}); it was made for another model, re-run `tensorcut analyze` on "
                "this one"
            )
    measured = config.allocation == "measured"
    if isinstance(drops, (str, Path)):
        drops = load_drops(drops, ck.model, config, shape)
    source = ck.info
    measure_now = measured and drops is None and precomputed is None
    needed = (
        "--match-epochs" if match_epochs > 0 else ("--allocation measured" if measure_now else None)
    )
    n_bn = _batchnorm_layers(ck.model)
    want_bn = bn_images is None or bn_images > 0 or bn_loader is not None
    loader: Any = None
    where: dict[str, Any] = {}
    if needed is not None or (want_bn and n_bn > 0):
        loader, where = _calibration_loader(source, bn_images, bn_loader, needed)
    if measure_now:
        from tensorcut.compression.measured import measure_layer_drops

        assert loader is not None  # needed_by: _calibration_loader loads or raises
        drops = measure_layer_drops(ck.model, loader, config, layers=layers, progress=progress)
    p = precomputed or plan(
        ck.model,
        config,
        input_shape=shape,
        sensitivity=sens,
        layers=layers,
        drops=drops if measured else None,
        progress=progress,
    )
    if not any(lp.status == "factorize" for lp in p.layers):
        reasons = "; ".join(f"{lp.name}: {lp.reason}" for lp in p.layers[:3])
        if config.target_speedup is not None:
            raise TensorcutError(
                f"no layer runs faster factorized on this machine ({reasons}); the dense model "
                "is the fastest here, so nothing was written"
            )
        raise TensorcutError(f"the rank rule leaves nothing to compress ({reasons}); loosen it")
    reference = copy.deepcopy(ck.model) if match_epochs > 0 else None
    model = apply(ck.model, p)
    lineage = dataclasses.replace(
        source.lineage, parent=Parent(str(src), source.metrics), plan=p.to_dict()
    )
    if want_bn:
        record = _recalibrate(model, loader, where, n_bn, default=bn_images is None)
        lineage = dataclasses.replace(lineage, bn_recalibration=record)
    if reference is not None:
        lineage = dataclasses.replace(
            lineage,
            layer_matching=_match(model, reference, loader, n_bn, match_epochs, match_lr, progress),
        )
    metrics = Metrics()
    if evaluate_split:
        ds = _dataset_from_meta(source, evaluate_split)
        ev = evaluate_loader(model, tdata.make_loader(ds, 512), "cpu")
        metrics = metrics.with_scores(**{evaluate_split: _score(ev)})
    # the training history belongs to the dense weights; the rest (recipe, epochs) is kept
    info = dataclasses.replace(source, lineage=lineage, metrics=metrics, history=None)
    meta = info.to_meta()
    tio.save(model, out, meta)
    (out / "train_state.pt").unlink(
        missing_ok=True
    )  # a replaced (--force) checkpoint's training state is not ours
    if measure_now:
        assert drops is not None  # measured above
        drops.save(out / DROPS_FILE)  # reusable: compress --allocation measured --drops
    after = {
        k: getattr(lineage, k).to_dict()
        for k in ("bn_recalibration", "layer_matching")
        if getattr(lineage, k) is not None
    }
    if after:  # the plan file also says what was done after it
        tio.atomic_write_text(out / "plan.json", json.dumps(dict(p.to_dict(), **after), indent=2))
    else:
        p.save(out / "plan.json")  # written last: a checkpoint without it is unfinished
    return model, p, meta


#: the measured drops ``compress --allocation measured`` saves beside the plan (without --drops)
DROPS_FILE = "drops.json"


def _score(evaluation: dict[str, Any]) -> Score:
    """An evaluation's metrics as recorded (plain JSON numbers)."""
    return Score.from_dict(json.loads(json.dumps(evaluation)), "metrics")


#: Training images whose BatchNorm statistics ``tensorcut compress`` re-estimates by default.
DEFAULT_BN_IMAGES = 2048


def _batchnorm_layers(model: nn.Module) -> int:
    """BatchNorm layers that keep running statistics (what re-estimation changes)."""
    return sum(
        1
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    )


def _calibration_loader(
    meta: CheckpointMeta, bn_images: int | None, bn_loader: Any, needed_by: str | None
) -> tuple[Any, dict[str, Any]]:
    """(calibration batches or None, how they were obtained: ``requested``/``data``, or
    ``skipped`` and why).

    The default (``bn_images`` None) skips with the reason when the data set is not available,
    unless ``needed_by`` (a flag that cannot run without the images) says otherwise.
    """
    import warnings

    if bn_loader is not None:
        return bn_loader, {"data": "given batches"}
    default = bn_images is None
    want = DEFAULT_BN_IMAGES if bn_images is None else bn_images
    if not meta.dataset.name:
        if needed_by is not None:
            raise TensorcutError(
                f"{needed_by} needs calibration images, and the checkpoint names no data set"
            )
        if default:
            return None, {"skipped": "the checkpoint names no data set"}
    try:
        with warnings.catch_warnings():
            if default:  # "up to" the default: a smaller training split is no surprise
                warnings.filterwarnings("ignore", message=".*fewer than the requested subset")
            ds = _dataset_from_meta(meta, "train", subset=want)
    except TensorcutError as e:
        if not default or needed_by is not None:
            raise
        return None, {"skipped": f"its data set is not available ({e})"}
    return tdata.make_loader(ds, 128), {"requested": want, "data": "train split"}


def _images_of(loader: Any) -> int | None:
    return len(loader.dataset) if hasattr(loader, "dataset") else None


def _recalibrate(
    model: nn.Module, loader: Any, where: dict[str, Any], n_bn: int, *, default: bool
) -> BatchNormRecord:
    """Re-estimate BatchNorm statistics after the swap; the record of what was done, or why not.

    Why by default: a factorized convolution shifts the distribution its BatchNorm sees, and
    with the trained statistics a compressed network can start fine-tuning near chance.
    """
    from tensorcut.train.loop import recalibrate_bn

    record: dict[str, Any] = {
        "batchnorm_layers": n_bn,
        "default": default and where.get("data") != "given batches",
    }
    if n_bn == 0:
        return _bn_record(record, images=0, skipped="the model has no BatchNorm layers")
    if loader is None:
        return _bn_record(record, images=0, skipped=where["skipped"])
    recalibrate_bn(model, loader)
    return _bn_record(record, **where, images=_images_of(loader))


def _match(
    model: nn.Module,
    reference: nn.Module,
    loader: Any,
    n_bn: int,
    epochs: int,
    lr: float,
    progress: bool,
) -> MatchRecord:
    """Layer matching on the calibration batches, then BatchNorm re-estimated again (the conv
    outputs changed); the record of it."""
    from tensorcut.compression.recover import match_layers
    from tensorcut.train.loop import recalibrate_bn

    res = match_layers(model, reference, loader, epochs=epochs, lr=lr, progress=progress)
    if n_bn > 0:
        recalibrate_bn(model, loader)
    return MatchRecord(
        epochs=epochs,
        lr=float(lr),
        images=_images_of(loader),
        steps=int(res["steps"]),
        before=float(res["before"]),
        after=float(res["after"]),
        bn_after=n_bn > 0,
    )


def _bn_record(record: dict[str, Any], **more: Any) -> BatchNormRecord:
    """The ``bn_recalibration`` record with these keys, in this order."""
    return BatchNormRecord.from_dict(dict(record, **more), "bn_recalibration")


def match_line(record: dict[str, Any] | MatchRecord | None) -> str | None:
    """One console line saying what layer matching did (``record``: the ``layer_matching`` entry
    of ``meta.json``); None when it was not run.

    Example:
        >>> line = match_line({"epochs": 3, "lr": 0.001, "images": 2048, "steps": 48,
        ...                    "before": 0.2, "after": 0.05, "bn_after": True})
        >>> line.endswith("output error 0.2000 -> 0.0500, BatchNorm re-estimated again")
        True
    """
    if record is None:
        return None
    if not isinstance(record, MatchRecord):
        record = MatchRecord.from_dict(record, "layer_matching")
    on = f"{record.images} calibration images" if record.images else "the calibration batches"
    line = (
        f"layer matching: {record.epochs} epoch(s) on {on} ({record.steps} Adam steps, lr "
        f"{record.lr:g}): output error {record.before:.4f} -> {record.after:.4f}"
    )
    return line + (", BatchNorm re-estimated again" if record.bn_after else "")


def bn_recalibration_line(record: dict[str, Any] | BatchNormRecord | None) -> str:
    """One console line saying what :func:`compress_checkpoint` did to BatchNorm statistics
    (``record``: the ``bn_recalibration`` entry of ``meta.json``, or None when there is none)."""
    if record is None:
        return "BatchNorm statistics: kept as trained (--bn-images 0)"
    if not isinstance(record, BatchNormRecord):
        record = BatchNormRecord.from_dict(record, "bn_recalibration")
    if record.skipped is not None:
        return f"BatchNorm statistics: not re-estimated, {record.skipped}"
    on = f"{record.images} training images" if record.data == "train split" else "given batches"
    line = f"BatchNorm statistics: re-estimated on {on} ({record.batchnorm_layers} layers)"
    return line + (" by default; --bn-images 0 keeps the trained ones" if record.default else "")


def _dataset_from_meta(
    meta: CheckpointMeta, split: str, dataset: str | None = None, subset: int | None = None
) -> tdata.ImageDataset:
    """``split`` of the checkpoint's data set (or of ``dataset``, in its default folder), with
    the recorded hold-out; refused in one line when the images do not fit the model."""
    from tensorcut.train.api import check_dataset_fits

    spec: DatasetSpec = meta.dataset.resolve(dataset or None)
    ds = spec.load(split, subset=subset)
    # wrong channel count / input size: one line, not a conv traceback
    check_dataset_fits({"model": meta.model.to_dict()}, ds, str(spec.name))
    return ds


def finetune_checkpoint(
    src: str | Path,
    out: str | Path | None = None,
    *,
    dataset: str | None = None,
    config: FitConfig | None = None,
    distill_from: str | Path | None = None,
    batch_size: int = 128,
    subset: int | None = None,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> tio.Checkpoint:
    """Fine-tune a (compressed) checkpoint; default recipe :data:`FINETUNE_RECIPE` (the thesis's).

    Writes to ``out`` (refused when it already holds a checkpoint, unless ``force``) and
    reports test metrics (``resume`` continues a run interrupted in ``out``). Without ``out`` (or
    with ``out == src``) ``src`` is replaced, but only once the fine-tuned checkpoint is completely
    written: training checkpoints go to the sibling folder ``.<name>.finetune.tmp``, which then
    takes ``src``'s place, so an interrupted run leaves ``src`` as it was (``resume`` continues from
    that folder). ``distill_from`` names a dense checkpoint used as teacher.
    """
    src = Path(src)
    in_place = out is None or Path(out).resolve() == src.resolve()
    ck = tio.load_checkpoint(src)
    if in_place:
        out = src.parent / f".{src.name}.finetune.tmp"
    else:
        assert out is not None  # in_place covers out=None
        out = Path(out)
        if not (resume and (out / tio.META).exists()):  # resuming into out is asked for
            check_output_dir(out, force=force)
    cfg = config or copy.deepcopy(FINETUNE_RECIPE)
    teacher = tio.load(distill_from) if distill_from else None
    if teacher is not None and cfg.distill_alpha == 0:
        cfg.distill_alpha = 0.5
    source = ck.info
    tr = _dataset_from_meta(source, "train", dataset, subset)
    va = _dataset_from_meta(source, "val", dataset)
    te = _dataset_from_meta(source, "test", dataset)
    dev = resolve_device(device)
    record = FinetuneRecord(
        epochs=cfg.epochs,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        patience=cfg.patience,
        distill_from=str(distill_from) if distill_from else None,
        subset=subset,
        train_images=len(tr),
    )
    info = dataclasses.replace(source, lineage=dataclasses.replace(source.lineage, finetune=record))
    meta = info.to_meta()  # what fit's per-epoch checkpoints record
    from tensorcut import distributed as tdist

    resume = resume and (out / tio.META).exists()
    if in_place and not resume:
        tdist.run_on_main(
            lambda: _fresh_copy(src, out)
        )  # plan.json and other side files travel with the weights
    before = evaluate_loader(ck.model, tdata.make_loader(te, 512), dev)
    hist = fit(
        ck.model,
        tdata.make_loader(tr, batch_size, shuffle=True, seed=cfg.seed),
        tdata.make_loader(va, 512),
        cfg,
        device=dev,
        out_dir=out,
        meta=meta,
        resume=resume,
        teacher=teacher,
        progress=progress,
    )
    after = evaluate_loader(ck.model, tdata.make_loader(te, 512), dev)
    metrics = (info.metrics or Metrics()).with_scores(
        test_before_finetune=_score(before), test=_score(after)
    )
    rows = json.loads(json.dumps(hist, default=tio.json_default))  # as meta.json holds them
    info = dataclasses.replace(
        info,
        metrics=metrics,
        finetune_history=tuple(
            EpochRecord.from_dict(r, f"finetune_history[{i}]") for i, r in enumerate(rows)
        ),
        history=None,
    )
    meta = info.to_meta()

    def finish() -> None:
        tio.save(ck.model, out, meta)
        if in_place:
            _swap_in(out, src)

    tdist.run_on_main(finish)  # under torchrun: rank 0 writes
    tdist.barrier()
    return tio.Checkpoint(ck.model, meta)


def _fresh_copy(src: Path, work: Path) -> None:
    """``work`` := a copy of checkpoint ``src`` without its exports (they describe the old
    weights)."""
    from tensorcut.export import FORMATS

    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(
        src, work, ignore=shutil.ignore_patterns(*FORMATS.values(), "train_state.pt", ".*.tmp")
    )


def _swap_in(work: Path, src: Path) -> None:
    """Put the completely written checkpoint ``work`` in ``src``'s place; the old one goes only
    afterwards."""
    (work / "train_state.pt").unlink(missing_ok=True)
    old = src.parent / f".{src.name}.previous.tmp"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(src, old)
    os.replace(work, src)
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(
    src: str | Path, fmt: str, out: str | Path | None = None, *, force: bool = False
) -> Path:
    """Export checkpoint ``src`` to ``fmt``; default file name inside ``src``. See
    :func:`export_checkpoint_checked`."""
    return export_checkpoint_checked(src, fmt, out, force=force).path


def export_checkpoint_checked(
    src: str | Path, fmt: str, out: str | Path | None = None, *, force: bool = False
) -> Export:
    """Export checkpoint ``src`` to ``fmt`` and say whether the export was checked against PyTorch.

    The target (default: the format's file name inside ``src``) may replace an earlier export
    in the same format; any other existing file needs ``force``, and the checkpoint's own
    files are never replaced.
    """
    from tensorcut.export import FORMATS, export_with_check, is_export_of, require_onnx

    if fmt not in FORMATS:
        raise TensorcutError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()  # before loading anything
    ck = tio.load_checkpoint(src)
    target = Path(out) if out else Path(src) / FORMATS[fmt]
    if target.is_dir():
        raise TensorcutError(f"{target} is a directory; give a file path for --out")
    own = {
        (Path(src) / n).resolve() for n in (tio.WEIGHTS, tio.META, "plan.json", "train_state.pt")
    }
    if target.resolve() in own:
        raise TensorcutError(
            f"--out {target} is a file of the checkpoint itself; give another file path"
        )
    if target.exists() and not force and not is_export_of(target, fmt):
        raise TensorcutError(
            f"{target} exists and is not an earlier {fmt} export; pass --force to replace it "
            "or give another --out"
        )
    return export_with_check(ck.model, input_shape_of(ck.meta), fmt, target)
