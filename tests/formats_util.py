"""Writers for the on-disk data formats, shared by tests."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    """Write an unsigned-byte IDX file."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def pickle_dump(obj: object, path: Path) -> None:
    """Write a python-pickle file (as CIFAR's python version is)."""
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)
