"""Typed views of a checkpoint's ``meta.json``, read and validated in one place:
:class:`ModelSpec` (``meta["model"]``), :class:`DatasetSpec` (``meta["dataset"]``) and
:class:`CheckpointMeta`, which bundles them with the lineage, metrics and history of
:mod:`tensorcut.checkpoint.records`.

Every verb that needs "which model", "which data set", "made from what" or "how good" asks these
classes instead of reading the dict: the field types are checked once (a hand-edited value is
one line, not a traceback later), and the rule that rebuilds a split (the recorded folder
applies only to the recorded data set; a ``--dataset`` override uses its default location) lives
here alone. Old checkpoints still load: a section an older version did not write is None;
without a ``dataset`` entry :meth:`DatasetSpec.from_meta` gives an empty spec and
:meth:`DatasetSpec.load` asks for ``--dataset``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensorcut.checkpoint.records import (
    EDITED,
    EpochRecord,
    Lineage,
    Metrics,
    Score,
    field_error,
    read_history,
)
from tensorcut.errors import TensorcutError

if TYPE_CHECKING:
    from torch import nn

    from tensorcut.data import ImageDataset

__all__ = ["EDITED", "CheckpointMeta", "DatasetSpec", "ModelSpec"]

#: the default message when no data set is named anywhere
NO_DATASET = "the checkpoint does not name its data set; pass --dataset"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ModelSpec:
    """A zoo architecture and its constructor arguments (``meta["model"]``).

    Example:
        >>> ModelSpec.from_meta({"model": {"name": "resnet20", "kwargs": {"width": 0.5}}}).name
        'resnet20'
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_meta(
        cls,
        meta: dict[str, Any],
        source: str | Path = "meta.json",
        *,
        fix: str = EDITED,
        missing: str | None = None,
    ) -> ModelSpec:
        """Read ``meta["model"]``; refuse a missing name or non-object kwargs in one line.

        Args:
            meta: the parsed ``meta.json`` (or the metadata about to be written).
            source: the file (or thing) named in messages.
            fix: the fix-it tail of a field's message.
            missing: the whole message when the name is missing (default: "SOURCE lacks
                model.name; it cannot be rebuilt").

        Raises:
            TensorcutError: no model name, or kwargs that are not an object.
        """
        m = meta.get("model")
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise TensorcutError(missing or f"{source} lacks model.name; it cannot be rebuilt")
        kwargs = m.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise TensorcutError(
                f"{source}: model.kwargs must be an object, not {type(kwargs).__name__}; {fix}"
            )
        return cls(m["name"], dict(kwargs))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": copy.deepcopy(self.kwargs)}

    def create(self) -> nn.Module:
        """A fresh (randomly initialised) instance from the model registry."""
        from tensorcut import models

        return models.create(self.name, **self.kwargs)

    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image: the ``in_channels`` and ``input_size`` arguments, by
        default the zoo's (3, 32, 32)."""
        s = int(self.kwargs.get("input_size", 32))
        return (int(self.kwargs.get("in_channels", 3)), s, s)


_DATASET_FIELDS = {
    "name": (lambda v: v is None or (isinstance(v, str) and v != ""), "a data-set name"),
    "data_dir": (lambda v: v is None or isinstance(v, str), "a folder path or null"),
    "seed": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "subset": (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null"),
    "val_fraction": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
}


@dataclass(frozen=True)
class DatasetSpec:
    """The data set a checkpoint was trained on (``meta["dataset"]``): its name, folder, the
    seeded validation hold-out and the training subset.

    Example:
        >>> spec = DatasetSpec(name="digits")
        >>> len(spec.load("val")) > 0
        True
    """

    name: str | None = None
    data_dir: str | None = None
    val_fraction: float = 0.1
    seed: int = 0
    subset: int | None = None

    @classmethod
    def from_meta(
        cls, meta: dict[str, Any], source: str | Path = "meta.json", *, fix: str = EDITED
    ) -> DatasetSpec:
        """Read and check ``meta["dataset"]`` (absent or null: an empty spec).

        Raises:
            TensorcutError: a field of the wrong type or out of range, naming the field.
        """
        ds = meta.get("dataset")
        if ds is None:
            return cls()
        if not isinstance(ds, dict):
            raise TensorcutError(
                f'{source}: "dataset" must be an object such as {{"name": "digits", "seed": 0}}, '
                f"not {type(ds).__name__} {ds!r}; {fix}"
            )
        for key, (ok, what) in _DATASET_FIELDS.items():
            if key in ds and not ok(ds[key]):
                raise TensorcutError(
                    f"{source}: dataset.{key} must be {what}, not {ds[key]!r}; {fix}"
                )
        known = {k: ds[k] for k in _DATASET_FIELDS if k in ds and ds[k] is not None}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolve(self, name: str | None = None, data_dir: str | Path | None = None) -> DatasetSpec:
        """This spec with a user's override: another ``name`` drops the recorded folder (it
        belongs to the recorded data set), an explicit ``data_dir`` wins."""
        spec = self
        if name is not None and name != self.name:
            spec = replace(spec, name=name, data_dir=None)
        if data_dir is not None:
            spec = replace(spec, data_dir=str(data_dir))
        return spec

    def load(
        self,
        split: str,
        *,
        subset: int | None = None,
        augment: bool = False,
        missing: str = NO_DATASET,
    ) -> ImageDataset:
        """The ``split`` ('train', 'val' or 'test') as recorded: same folder, same seeded
        validation hold-out.

        Args:
            split: which split.
            subset: a seeded random subset of this many images (default: all).
            augment: training augmentation.
            missing: the one-line error when no data set is named.

        Raises:
            TensorcutError: no data set named, or the data set's files cannot be read.
        """
        from tensorcut import data as tdata

        if not self.name:
            raise TensorcutError(missing)
        return tdata.load_dataset(
            self.name,
            split,
            data_dir=self.data_dir,
            val_fraction=self.val_fraction,
            seed=self.seed,
            subset=subset,
            augment=augment,
        )


#: top-level keys kept as they are (checked by the checkpoint loader, which gives its own messages)
_RAW_KEYS = ("layers", "versions", "format", "format_version")


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything ``meta.json`` records, typed: read with :meth:`from_meta`, written with
    :meth:`to_meta` (the same JSON: ``to_meta(from_meta(d)) == d`` for what tensorcut writes).

    A section an older checkpoint lacks is None (the data set: an empty :class:`DatasetSpec`).
    ``layers`` (the factorized layers' configurations), ``versions`` and the format marker are
    kept as they are; keys this version does not know are kept in ``extra``.

    Example:
        >>> cm = CheckpointMeta.from_meta({"model": {"name": "resnet20"},
        ...                                "metrics": {"test": {"loss": 0.4, "top1": 0.9}}})
        >>> cm.model.name, cm.metrics["test"].top1, cm.lineage.parent
        ('resnet20', 0.9, None)
    """

    model: ModelSpec
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    lineage: Lineage = field(default_factory=Lineage)
    metrics: Metrics | None = None
    history: tuple[EpochRecord, ...] | None = None
    epoch: int | None = None
    finetune_history: tuple[EpochRecord, ...] | None = None
    layers: Any = None
    versions: Any = None
    format: Any = None
    format_version: Any = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_meta(
        cls, meta: Any, source: str | Path = "meta.json", *, fix: str = EDITED
    ) -> CheckpointMeta:
        """Read and check every field of ``meta`` (the parsed ``meta.json``).

        Args:
            meta: the parsed JSON.
            source: the file (or thing) named in messages.
            fix: the fix-it tail of a field's message.

        Raises:
            TensorcutError: one line naming the first field of the wrong type or out of range.
        """
        if not isinstance(meta, dict):
            raise TensorcutError(
                f"{source} must hold a JSON object, not {type(meta).__name__}; {fix}"
            )
        model = ModelSpec.from_meta(meta, source, fix=fix)
        dataset = DatasetSpec.from_meta(meta, source, fix=fix)
        lineage = Lineage.from_meta(meta, source, fix=fix)
        m = meta.get("metrics")
        metrics = None if m is None else Metrics.from_dict(m, "metrics", source, fix)
        epoch = meta.get("epoch")
        if epoch is not None and not (_is_int(epoch) and epoch >= 0):
            raise field_error(source, "epoch", "a non-negative integer", epoch, fix)
        known = {"model", "dataset", "metrics", "history", "epoch", "finetune_history"}
        known.update(Lineage.KEYS, _RAW_KEYS)
        return cls(
            model=model,
            dataset=dataset,
            lineage=lineage,
            metrics=metrics,
            history=read_history(meta.get("history"), "history", source, fix),
            epoch=epoch,
            finetune_history=read_history(
                meta.get("finetune_history"), "finetune_history", source, fix
            ),
            **{k: copy.deepcopy(meta.get(k)) for k in _RAW_KEYS},
            extra={k: copy.deepcopy(v) for k, v in meta.items() if k not in known},
        )

    def to_meta(self) -> dict[str, Any]:
        """The ``meta.json`` object (absent sections left out)."""
        out: dict[str, Any] = {"model": self.model.to_dict()}
        if self.dataset != DatasetSpec():
            out["dataset"] = self.dataset.to_dict()
        out.update(self.lineage.to_meta())
        if self.metrics is not None:
            out["metrics"] = self.metrics.to_dict()
        for key in ("history", "finetune_history"):
            rows = getattr(self, key)
            if rows is not None:
                out[key] = [r.to_dict() for r in rows]
        if self.epoch is not None:
            out["epoch"] = self.epoch
        for key in _RAW_KEYS:
            if getattr(self, key) is not None:
                out[key] = copy.deepcopy(getattr(self, key))
        out.update(copy.deepcopy(self.extra))
        return out

    def score(self, split: str) -> Score | None:
        """The recorded evaluation of ``split`` (None when there is none)."""
        return None if self.metrics is None else self.metrics.get(split)
