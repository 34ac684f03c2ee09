"""Typed views of a checkpoint's ``meta.json``: :class:`ModelSpec` (``meta["model"]``) and
:class:`DatasetSpec` (``meta["dataset"]``).

Every verb that needs "which model" or "which data set" asks these classes instead of reading
the dict: the field types are checked once (a hand-edited value is one line, not a traceback
later), and the rule that rebuilds a split (the recorded folder applies only to the recorded
data set; a ``--dataset`` override uses its default location) lives here alone. Old checkpoints
without a ``dataset`` entry still load: :meth:`DatasetSpec.from_meta` gives an empty spec and
:meth:`DatasetSpec.load` asks for ``--dataset``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensorcut.errors import TensorcutError

if TYPE_CHECKING:
    from torch import nn

    from tensorcut.data import ImageDataset

__all__ = ["DatasetSpec", "ModelSpec"]

#: the fix-it tail of every "this field was edited" message
EDITED = "the file was edited; restore it or correct that field"

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
    def from_meta(cls, meta: dict[str, Any], source: str | Path = "meta.json") -> ModelSpec:
        """Read ``meta["model"]``; refuse a missing name or non-object kwargs in one line."""
        m = meta.get("model")
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise TensorcutError(f"{source} lacks model.name; it cannot be rebuilt")
        kwargs = m.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise TensorcutError(
                f"{source}: model.kwargs must be an object, not {type(kwargs).__name__}; {EDITED}"
            )
        return cls(m["name"], dict(kwargs))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    def create(self) -> nn.Module:
        """A fresh (randomly initialised) instance from the model registry."""
        from tensorcut import models

        return models.create(self.name, **self.kwargs)


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
    def from_meta(cls, meta: dict[str, Any], source: str | Path = "meta.json") -> DatasetSpec:
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
                f"not {type(ds).__name__} {ds!r}; {EDITED}"
            )
        for key, (ok, what) in _DATASET_FIELDS.items():
            if key in ds and not ok(ds[key]):
                raise TensorcutError(
                    f"{source}: dataset.{key} must be {what}, not {ds[key]!r}; {EDITED}"
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
