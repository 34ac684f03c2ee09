"""The records of a checkpoint's ``meta.json`` besides the model and the data set: its
:class:`Metrics` (one :class:`Score` per split), its :class:`EpochRecord` history, and its
:class:`Lineage` (the :class:`Parent` checkpoint, the compression plan, the :class:`Recipe`, the
:class:`FinetuneRecord`, the :class:`BatchNormRecord`, the :class:`MatchRecord` and the
:class:`TdlrtRecord`).

Each record checks its fields when read (:meth:`Record.from_dict`; a value of the wrong type is
one line naming it) and writes back exactly what it read (:meth:`Record.to_dict`): the keys it
held, in their order, and the keys this version does not know. So a record an older version
wrote (a recipe without ``momentum``, a fine-tuning record without ``train_images``) round-trips
unchanged. :class:`tensorcut.checkpoint.meta.CheckpointMeta` bundles them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from tensorcut.errors import TensorcutError

__all__ = [
    "EDITED",
    "BatchNormRecord",
    "EpochRecord",
    "FinetuneRecord",
    "Lineage",
    "MatchRecord",
    "Metrics",
    "Parent",
    "Recipe",
    "Record",
    "Score",
    "TdlrtRecord",
    "field_error",
    "read_history",
]

#: the fix-it tail of every "this field was edited" message
EDITED = "the file was edited; restore it or correct that field"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    """A JSON number (NaN and infinities included: a diverged loss is still a record)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def field_error(source: str | Path, path: str, what: str, value: Any, fix: str) -> TensorcutError:
    return TensorcutError(f"{source}: {path} must be {what}, not {_show(value)}; {fix}")


def _object(value: Any, path: str, example: str, source: str | Path, fix: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TensorcutError(
            f"{source}: {path} must be an object such as {example}, not "
            f"{type(value).__name__} {_show(value)}; {fix}"
        )
    return value


#: a field check: (test, what the value must be)
_Check = tuple[Callable[[Any], bool], str]
NUMBER: _Check = (_is_real, "a number")
FRACTION: _Check = (lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1]")
COUNT: _Check = (lambda v: _is_int(v) and v >= 0, "a non-negative integer")
TEXT: _Check = (lambda v: isinstance(v, str), "a string")
FLAG: _Check = (lambda v: isinstance(v, bool), "true or false")
OBJECT: _Check = (lambda v: isinstance(v, dict), "an object")


def _or_null(check: _Check) -> _Check:
    ok, what = check
    return (lambda v: v is None or ok(v), f"{what} or null")


_R = TypeVar("_R", bound="Record")


@dataclass(frozen=True)
class Record:
    """One JSON object of known, typed keys (``FIELDS``: key -> check), read and written back
    as it was: the keys it held in their order (``order``; None for a record made in code, which
    writes every field) and the keys this version does not know (``extra``)."""

    FIELDS: ClassVar[dict[str, _Check]] = {}
    EXAMPLE: ClassVar[str] = "{}"

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False)
    order: tuple[str, ...] | None = field(default=None, kw_only=True, repr=False, compare=False)

    @classmethod
    def from_dict(
        cls: type[_R], value: Any, path: str, source: str | Path = "meta.json", fix: str = EDITED
    ) -> _R:
        """Check ``value`` (found at ``path`` in ``source``) and read it; a field of the wrong
        type is one line naming it."""
        obj = _object(value, path, cls.EXAMPLE, source, fix)
        known: dict[str, Any] = {}
        for key, (ok, what) in cls.FIELDS.items():
            if key in obj:
                if not ok(obj[key]):
                    raise field_error(source, f"{path}.{key}", what, obj[key], fix)
                known[key] = copy.deepcopy(obj[key])
        extra = {k: copy.deepcopy(v) for k, v in obj.items() if k not in cls.FIELDS}
        return cls(**known, extra=extra, order=tuple(obj))

    def to_dict(self) -> dict[str, Any]:
        keys = self.order if self.order is not None else (*self.FIELDS, *self.extra)
        return {
            k: copy.deepcopy(getattr(self, k) if k in self.FIELDS else self.extra[k])
            for k in keys
            if k in self.FIELDS or k in self.extra
        }


@dataclass(frozen=True)
class Score(Record):
    """One evaluation (``metrics.<split>``): mean cross-entropy ``loss``, ``top1`` and ``top5``
    accuracy (fractions), over ``n`` images."""

    FIELDS: ClassVar[dict[str, _Check]] = {
        "loss": NUMBER,
        "top1": FRACTION,
        "top5": FRACTION,
        "n": COUNT,
    }
    EXAMPLE: ClassVar[str] = '{"loss": 0.31, "top1": 0.91, "top5": 0.99, "n": 360}'

    loss: float | None = None
    top1: float | None = None
    top5: float | None = None
    n: int | None = None


@dataclass(frozen=True)
class EpochRecord(Record):
    """One epoch of ``history`` (training) or ``finetune_history``; rows may carry more keys
    (TDLRT adds its ranks), kept in ``extra``."""

    FIELDS: ClassVar[dict[str, _Check]] = {
        "epoch": COUNT,
        "train_loss": NUMBER,
        "train_top1": FRACTION,
        "lr": NUMBER,
        "seconds": NUMBER,
        "val_loss": NUMBER,
        "val_top1": FRACTION,
        "val_top5": FRACTION,
    }
    EXAMPLE: ClassVar[str] = '{"epoch": 1, "train_loss": 0.5, "val_top1": 0.9}'

    epoch: int | None = None
    train_loss: float | None = None
    train_top1: float | None = None
    lr: float | None = None
    seconds: float | None = None
    val_loss: float | None = None
    val_top1: float | None = None
    val_top5: float | None = None


@dataclass(frozen=True)
class Recipe(Record):
    """How the checkpoint was trained (``recipe``): the settings a resumed run must keep."""

    FIELDS: ClassVar[dict[str, _Check]] = {
        "method": TEXT,
        "epochs": COUNT,
        "optimizer": TEXT,
        "lr": NUMBER,
        "momentum": NUMBER,
        "weight_decay": NUMBER,
        "scheduler": TEXT,
        "batch_size": COUNT,
        "augment": FLAG,
        "patience": _or_null(COUNT),
    }
    EXAMPLE: ClassVar[str] = '{"epochs": 10, "optimizer": "adam", "lr": 0.001}'

    method: str | None = None
    epochs: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    scheduler: str | None = None
    batch_size: int | None = None
    augment: bool | None = None
    patience: int | None = None


@dataclass(frozen=True)
class FinetuneRecord(Record):
    """How a checkpoint was fine-tuned (``finetune``)."""

    FIELDS: ClassVar[dict[str, _Check]] = {
        "epochs": COUNT,
        "optimizer": TEXT,
        "lr": NUMBER,
        "patience": _or_null(COUNT),
        "distill_from": _or_null(TEXT),
        "subset": _or_null(COUNT),
        "train_images": COUNT,
    }
    EXAMPLE: ClassVar[str] = '{"epochs": 50, "optimizer": "adam", "lr": 1e-05}'

    epochs: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    patience: int | None = None
    distill_from: str | None = None
    subset: int | None = None
    train_images: int | None = None


@dataclass(frozen=True)
class BatchNormRecord(Record):
    """What ``compress`` did to BatchNorm statistics (``bn_recalibration``): re-estimated on
    ``images`` images (``data``), or ``skipped`` and why."""

    FIELDS: ClassVar[dict[str, _Check]] = {
        "batchnorm_layers": COUNT,
        "default": FLAG,
        "images": _or_null(COUNT),
        "requested": COUNT,
        "data": TEXT,
        "skipped": TEXT,
    }
    EXAMPLE: ClassVar[str] = '{"batchnorm_layers": 4, "default": true, "images": 2048}'

    batchnorm_layers: int | None = None
    default: bool | None = None
    images: int | None = None
    requested: int | None = None
    data: str | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class MatchRecord(Record):
    """What ``compress --match-epochs`` did before fine-tuning (``layer_matching``): each
    factorized conv fitted to its dense original's output on ``images`` calibration images for
    ``epochs`` passes (``steps`` Adam steps at ``lr``); ``before`` / ``after`` are the mean over
    layers of the relative squared output error, and ``bn_after`` whether BatchNorm statistics
    were re-estimated again afterwards."""

    FIELDS: ClassVar[dict[str, _Check]] = {
        "epochs": COUNT,
        "lr": NUMBER,
        "images": _or_null(COUNT),
        "steps": COUNT,
        "before": NUMBER,
        "after": NUMBER,
        "bn_after": FLAG,
    }
    EXAMPLE: ClassVar[str] = '{"epochs": 3, "lr": 0.001, "before": 0.21, "after": 0.08}'

    epochs: int | None = None
    lr: float | None = None
    images: int | None = None
    steps: int | None = None
    before: float | None = None
    after: float | None = None
    bn_after: bool | None = None


@dataclass(frozen=True)
class TdlrtRecord(Record):
    """Settings and outcome of a TDLRT run (``tdlrt``)."""

    FIELDS: ClassVar[dict[str, _Check]] = {
        "tau": NUMBER,
        "init_rank": _or_null(COUNT),
        "rmin": COUNT,
        "rmax": _or_null(COUNT),
        "init_from": _or_null(TEXT),
        "final_ranks": OBJECT,
        "conv_cr": NUMBER,
        "conv_compression_pct": NUMBER,
    }
    EXAMPLE: ClassVar[str] = '{"tau": 0.1, "rmin": 2, "rmax": null}'

    tau: float | None = None
    init_rank: int | None = None
    rmin: int | None = None
    rmax: int | None = None
    init_from: str | None = None
    final_ranks: dict[str, list[int]] | None = None
    conv_cr: float | None = None
    conv_compression_pct: float | None = None


@dataclass(frozen=True)
class Metrics:
    """Evaluations by split (``metrics``): ``test``, ``val``, and after fine-tuning
    ``test_before_finetune``.

    Example:
        >>> Metrics.from_dict({"test": {"loss": 0.3, "top1": 0.9}}, "metrics")["test"].top1
        0.9
    """

    scores: dict[str, Score] = field(default_factory=dict)

    EXAMPLE: ClassVar[str] = '{"test": {"loss": 0.31, "top1": 0.91}}'

    @classmethod
    def from_dict(
        cls, value: Any, path: str, source: str | Path = "meta.json", fix: str = EDITED
    ) -> Metrics:
        obj = _object(value, path, cls.EXAMPLE, source, fix)
        return cls({k: Score.from_dict(v, f"{path}.{k}", source, fix) for k, v in obj.items()})

    def to_dict(self) -> dict[str, Any]:
        return {k: s.to_dict() for k, s in self.scores.items()}

    def get(self, split: str) -> Score | None:
        return self.scores.get(split)

    def __getitem__(self, split: str) -> Score:
        return self.scores[split]

    def __contains__(self, split: object) -> bool:
        return split in self.scores

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)

    def with_scores(self, **scores: Score) -> Metrics:
        """These metrics with ``scores`` added (or replaced), in that order."""
        return Metrics({**self.scores, **scores})


@dataclass(frozen=True)
class Parent:
    """The checkpoint this one was made from (``parent``): its path and its metrics then (None
    when it had none)."""

    path: str
    metrics: Metrics | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, value: Any, source: str | Path = "meta.json", fix: str = EDITED) -> Parent:
        obj = _object(value, "parent", '{"path": "runs/dense", "metrics": {}}', source, fix)
        if not isinstance(obj.get("path"), str):
            raise field_error(source, "parent.path", "a checkpoint path", obj.get("path"), fix)
        m = obj.get("metrics")
        metrics = None if m is None else Metrics.from_dict(m, "parent.metrics", source, fix)
        extra = {k: copy.deepcopy(v) for k, v in obj.items() if k not in ("path", "metrics")}
        return cls(obj["path"], metrics, extra)

    def to_dict(self) -> dict[str, Any]:
        m = None if self.metrics is None else self.metrics.to_dict()
        return {"path": self.path, "metrics": m, **copy.deepcopy(self.extra)}


@dataclass(frozen=True)
class Lineage:
    """How a checkpoint was made; each part None when it does not apply (or an older version
    did not record it).

    Attributes:
        parent: the checkpoint it was compressed from.
        plan: the compression plan applied, as :meth:`tensorcut.compression.Plan.to_dict`
            wrote it (``Plan.from_dict`` reads it back).
        recipe: the training recipe (train, ``train --method tdlrt``).
        finetune: the fine-tuning settings.
        bn_recalibration: what ``compress`` did to BatchNorm statistics.
        tdlrt: the TDLRT settings and final ranks.
        layer_matching: what ``compress --match-epochs`` did after BatchNorm re-estimation.
    """

    parent: Parent | None = None
    plan: dict[str, Any] | None = None
    recipe: Recipe | None = None
    finetune: FinetuneRecord | None = None
    bn_recalibration: BatchNormRecord | None = None
    tdlrt: TdlrtRecord | None = None
    layer_matching: MatchRecord | None = None

    KEYS: ClassVar[tuple[str, ...]] = (
        "parent",
        "plan",
        "recipe",
        "finetune",
        "bn_recalibration",
        "tdlrt",
        "layer_matching",
    )

    @classmethod
    def from_meta(
        cls, meta: dict[str, Any], source: str | Path = "meta.json", *, fix: str = EDITED
    ) -> Lineage:
        get = meta.get
        plan = get("plan")
        if plan is not None:
            _object(plan, "plan", '{"format": "tensorcut-plan", "layers": [...]}', source, fix)
        return cls(
            parent=None if get("parent") is None else Parent.from_dict(get("parent"), source, fix),
            plan=None if plan is None else copy.deepcopy(plan),
            recipe=_maybe(Recipe, get("recipe"), "recipe", source, fix),
            finetune=_maybe(FinetuneRecord, get("finetune"), "finetune", source, fix),
            bn_recalibration=_maybe(
                BatchNormRecord, get("bn_recalibration"), "bn_recalibration", source, fix
            ),
            tdlrt=_maybe(TdlrtRecord, get("tdlrt"), "tdlrt", source, fix),
            layer_matching=_maybe(
                MatchRecord, get("layer_matching"), "layer_matching", source, fix
            ),
        )

    def to_meta(self) -> dict[str, Any]:
        """The recorded parts as ``meta.json`` keys (absent ones left out)."""
        out: dict[str, Any] = {}
        for key in self.KEYS:
            part = getattr(self, key)
            if part is not None:
                out[key] = copy.deepcopy(part) if isinstance(part, dict) else part.to_dict()
        return out


def _maybe(cls: type[_R], value: Any, path: str, source: str | Path, fix: str) -> _R | None:
    return None if value is None else cls.from_dict(value, path, source, fix)


def read_history(
    value: Any, key: str, source: str | Path, fix: str
) -> tuple[EpochRecord, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise field_error(source, key, "a list of epoch records", value, fix)
    return tuple(
        EpochRecord.from_dict(row, f"{key}[{i}]", source, fix) for i, row in enumerate(value)
    )
