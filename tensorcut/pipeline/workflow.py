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
    Metrics,
    ModelSpec,
    Parent,
    Score,
)
from tensorcut.checkpoint import io as tio
from tensorcut.compression import CompressConfig, Plan, apply, plan
from tensorcut.errors import TensorcutError
from tensorcut.train.loop import FitConfig, fit, resolve_device
from tensorcut.train.loop import evaluate as evaluate_loader

if TYPE_CHECKING:
    from tensorcut.export import Export

__all__ = [
    "DEFAULT_BN_IMAGES",
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
    "load_sensitivity",
]

#: The thesis's fine-tuning recipe: Adam, lr 1e-5, early stopping on validation loss
#: (patience 3), <= 50 epochs.
FINETUNE_RECIPE = FitConfig(epochs=50, optimizer="adam", lr=1e-5, scheduler="none", patience=3)

#: The RSDTR paper's fine-tuning schedule (Gabor & Zdunek 2024), with the values of the authors'
#: CIFAR-10 script (``cifar.py -mode fine_tune`` and its README example): SGD with momentum 0.9
#: and weight decay 1e-4, a one-cycle learning rate peaking at 0.01, 160 epochs (batch 128, the
#: CLI's default), no early stopping. The one-cycle schedule also cycles momentum
#: (0.95 -> 0.85 -> 0.95), as ``OneCycleLR`` does for the authors; unlike theirs, our SGD uses
#: Nesterov momentum. Fine-tuning starts from the decomposed factors.
RSDTR_RECIPE = FitConfig(
    epochs=160,
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
    scheduler="onecycle",
    patience=None,
)

#: Named fine-tuning recipes (``tensorcut finetune --recipe NAME``).
RECIPES = {"thesis": FINETUNE_RECIPE, "rsdtr": RSDTR_RECIPE}


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
    force: bool = False,
) -> tuple[nn.Module, Plan, dict[str, Any]]:
    """Plan and apply ``config`` to checkpoint ``src``; save the compressed checkpoint and
    ``plan.json`` in ``out``.

    ``precomputed`` is a plan already made for this checkpoint's model (it is applied as is).
    ``bn_images`` > 0 re-estimates BatchNorm statistics of the compressed model on that many
    training images (seeded subset, no augmentation); ``bn_loader`` does it on the given batches.
    ``bn_images=None`` is the CLI's default: :data:`DEFAULT_BN_IMAGES` images when the model
    has BatchNorm layers and the checkpoint's data set can be loaded, else skipped with the
    reason. What was done (or why not) is recorded as ``bn_recalibration`` in ``meta.json`` and
    ``plan.json``. An ``out`` that already holds a checkpoint is refused unless ``force``.
    ``config.target_speedup`` plans from latencies measured on this machine (current torch
    threads, batch 1); the plan records the predicted and measured whole-model latency.
    """
    if bn_images is not None and bn_images < 0:
        raise TensorcutError(f"--bn-images must be >= 0, got {bn_images}")
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
    p = precomputed or plan(
        ck.model, config, input_shape=shape, sensitivity=sens, layers=layers, progress=progress
    )
    if not any(lp.status == "factorize" for lp in p.layers):
        reasons = "; ".join(f"{lp.name}: {lp.reason}" for lp in p.layers[:3])
        if config.target_speedup is not None:
            raise TensorcutError(
                f"no layer runs faster factorized on this machine ({reasons}); the dense model "
                "is the fastest here, so nothing was written"
            )
        raise TensorcutError(f"the rank rule leaves nothing to compress ({reasons}); loosen it")
    model = apply(ck.model, p)
    source = ck.info
    lineage = dataclasses.replace(
        source.lineage, parent=Parent(str(src), source.metrics), plan=p.to_dict()
    )
    if bn_images is None or bn_images > 0 or bn_loader is not None:
        record = _recalibrate(model, source, bn_images, bn_loader)
        lineage = dataclasses.replace(lineage, bn_recalibration=record)
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
    if lineage.bn_recalibration is not None:  # the plan file also says what was done after it
        doc = dict(p.to_dict(), bn_recalibration=lineage.bn_recalibration.to_dict())
        tio.atomic_write_text(out / "plan.json", json.dumps(doc, indent=2))
    else:
        p.save(out / "plan.json")
    return model, p, meta


def _score(evaluation: dict[str, Any]) -> Score:
    """An evaluation's metrics as recorded (plain JSON numbers)."""
    return Score.from_dict(json.loads(json.dumps(evaluation)), "metrics")


#: Training images whose BatchNorm statistics ``tensorcut compress`` re-estimates by default.
DEFAULT_BN_IMAGES = 2048


def _recalibrate(
    model: nn.Module, meta: CheckpointMeta, bn_images: int | None, bn_loader: Any
) -> BatchNormRecord:
    """Re-estimate BatchNorm statistics after the swap; the record of what was done, or why not.

    Why by default: a factorized convolution shifts the distribution its BatchNorm sees, and
    with the trained statistics a compressed network can start fine-tuning near chance.
    """
    import warnings

    from tensorcut.train.loop import recalibrate_bn

    default = bn_images is None and bn_loader is None
    n_bn = sum(
        1
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    )
    record: dict[str, Any] = {"batchnorm_layers": n_bn, "default": default}
    if n_bn == 0:
        return _bn_record(record, images=0, skipped="the model has no BatchNorm layers")
    if bn_loader is None:
        want = DEFAULT_BN_IMAGES if bn_images is None else bn_images
        if default and not meta.dataset.name:
            return _bn_record(record, images=0, skipped="the checkpoint names no data set")
        try:
            with warnings.catch_warnings():
                if default:  # "up to" the default: a smaller training split is no surprise
                    warnings.filterwarnings("ignore", message=".*fewer than the requested subset")
                ds = _dataset_from_meta(meta, "train", subset=want)
        except TensorcutError as e:
            if not default:
                raise
            return _bn_record(record, images=0, skipped=f"its data set is not available ({e})")
        bn_loader = tdata.make_loader(ds, 128)
        record.update(requested=want, data="train split")
    else:
        record["data"] = "given batches"
    recalibrate_bn(model, bn_loader)
    return _bn_record(
        record, images=len(bn_loader.dataset) if hasattr(bn_loader, "dataset") else None
    )


def _bn_record(record: dict[str, Any], **more: Any) -> BatchNormRecord:
    """The ``bn_recalibration`` record with these keys, in this order."""
    return BatchNormRecord.from_dict(dict(record, **more), "bn_recalibration")


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
