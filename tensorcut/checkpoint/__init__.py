"""Checkpoint metadata, typed: what model a checkpoint holds (:class:`ModelSpec`) and which data
set it was trained on (:class:`DatasetSpec`), read and validated in one place."""

from tensorcut.checkpoint.meta import DatasetSpec, ModelSpec

__all__ = ["DatasetSpec", "ModelSpec"]
