"""Checkpoint metadata, typed and read in one place: what model a checkpoint holds
(:class:`ModelSpec`), which data set it was trained on (:class:`DatasetSpec`), how it was made
(:class:`Lineage`), how good it is (:class:`Metrics`) and its training history
(:class:`EpochRecord`), bundled as :class:`CheckpointMeta`."""

from tensorcut.checkpoint.meta import CheckpointMeta, DatasetSpec, ModelSpec
from tensorcut.checkpoint.records import (
    BatchNormRecord,
    EpochRecord,
    FinetuneRecord,
    Lineage,
    MatchRecord,
    Metrics,
    Parent,
    Recipe,
    Score,
    TdlrtRecord,
)

__all__ = [
    "BatchNormRecord",
    "CheckpointMeta",
    "DatasetSpec",
    "EpochRecord",
    "FinetuneRecord",
    "Lineage",
    "MatchRecord",
    "Metrics",
    "ModelSpec",
    "Parent",
    "Recipe",
    "Score",
    "TdlrtRecord",
]
