"""Data sets as in-memory tensors: digits, fashion-mnist, cifar10, cifar100, synthetic.

Every data set is read from its standard on-disk format without unpickling arbitrary
objects: IDX files for Fashion-MNIST; for CIFAR the binary version, or the python
version through a restricted reader that accepts only numpy arrays, lists, dicts and
strings. A seeded validation split is held out of the training set.

``digits`` ships with the package (``tensorcut/_data/digits.npz``, 48 kB: the UCI "Optical
Recognition of Handwritten Digits" test set as scikit-learn distributes it, CC BY 4.0,
E. Alpaydin and C. Kaynak; see ``tensorcut/_data/README.md``), so it needs no download and no
scikit-learn.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import warnings
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tensorcut.errors import TensorcutError

__all__ = [
    "DatasetInfo",
    "ImageDataset",
    "dataset_info",
    "digits_arrays",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "read_idx",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGITS_FILE = "digits.npz"  # in tensorcut/_data
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Shape facts a model needs: classes, channels, image side."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int


_INFO = {
    "digits": DatasetInfo("digits", 10, 1, 8),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32),
    "synthetic": DatasetInfo("synthetic", 10, 3, 16),
}


def list_datasets() -> list[str]:
    """Names of every supported data set."""
    return sorted(_INFO)


def dataset_info(name: str) -> DatasetInfo:
    """Facts about data set ``name``; unknown names list the valid ones."""
    if name not in _INFO:
        raise TensorcutError(
            f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}"
        )
    return _INFO[name]


class ImageDataset(Dataset):
    """Normalised images ``(N, C, H, W)`` float32 and labels ``(N,)`` int64, optional light
    augmentation.

    Augmentation (training only): random crop after reflect-padding by ``pad`` pixels, and a
    horizontal flip when ``flip`` is set. Draws come from a seeded generator.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        augment: bool = False,
        pad: int = 2,
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise TensorcutError(
                f"images must be (N, C, H, W) with one label each; got {tuple(images.shape)} and "
                f"{tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels
        self.augment = augment
        self.pad = pad
        self.flip = flip
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.augment:
            x = self._augment(x)
        return x, self.labels[i]

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.pad:
            xp = torch.nn.functional.pad(x[None], (self.pad,) * 4, mode="reflect")[0]
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,), generator=self._gen).tolist()
            x = xp[:, dy : dy + h, dx : dx + w]
        if self.flip and torch.rand((), generator=self._gen).item() < 0.5:
            x = x.flip(-1)
        return x

    @property
    def info_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


# ----------------------------------------------------------------------------- readers


# DEFLATE expands at most ~1032:1, so a gzipped IDX file of n bytes holds at most this many
# times n bytes: a header claiming more is refused before anything is read or allocated.
_GZIP_MAX_EXPANSION = 1100


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), checking magic number and size.

    The header is read first and its shape checked against what the file can hold, so a corrupt
    header claiming billions of values is refused before anything is allocated; a file of zero
    values is refused as empty (naming it), not passed on to fail later as an empty split.
    """
    try:
        size = path.stat().st_size
        if size == 0 and path.is_file():
            raise TensorcutError(
                f"{path} is empty (0 bytes); re-install the data set or check --data-dir"
            )
        with open(path, "rb") as raw_f:
            gz = raw_f.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise TensorcutError(
                    f"{path} is not an unsigned-byte IDX file (bad magic number); check --data-dir"
                )
            ndim = head[3]
            shape = f.read(4 * ndim) if ndim in (1, 3) else b""
            if ndim not in (1, 3) or len(shape) < 4 * ndim:
                raise TensorcutError(
                    f"{path}: unexpected IDX rank {ndim}; expected labels (1) or images (3)"
                )
            dims = [int.from_bytes(shape[4 * i : 4 + 4 * i], "big") for i in range(ndim)]
            n = math.prod(dims)
            expected = 4 + 4 * ndim + n
            if n == 0:
                raise TensorcutError(
                    f"{path} is empty (its header says shape {dims}: no values); "
                    "re-install the data set or check --data-dir"
                )
            if not gz and expected != size:
                raise _size_mismatch(path, size, dims, expected)
            if gz and expected > size * _GZIP_MAX_EXPANSION:
                raise TensorcutError(
                    f"{path}: its header claims shape {dims} ({expected:,} bytes), more than a "
                    f"gzipped file of {size:,} bytes can hold; the file is corrupt — "
                    "re-install the data set"
                )
            body = f.read(n + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise TensorcutError(
            f"{path} is not a valid gzip file ({e or type(e).__name__}); re-install the data set"
        ) from None
    except OSError as e:
        raise TensorcutError(f"cannot read {path}: {e.strerror or e}") from None
    if len(body) != n:
        raise _size_mismatch(path, 4 + 4 * ndim + len(body), dims, expected)
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _size_mismatch(path: Path, size: int, dims: list[int], expected: int) -> TensorcutError:
    return TensorcutError(
        f"{path}: size {size:,} bytes does not match its header {dims} ({expected:,} bytes); "
        "the file is truncated or corrupt — re-install the data set"
    )


def _find(dirpath: Path, stem: str) -> Path | None:
    for cand in (stem, stem + ".gz"):
        p = dirpath / cand
        if p.exists():
            return p
    return None


def _load_fashion(data_dir: Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    d = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img, lab = _find(d, f"{prefix}-images-idx3-ubyte"), _find(d, f"{prefix}-labels-idx1-ubyte")
        if img is None or lab is None:
            raise TensorcutError(
                f"fashion-mnist not found in {d}: install it with `apt-get install -y "
                f"dataset-fashion-mnist` (files land in {FASHION_MNIST_DIR}) or pass --data-dir "
                "holding the four IDX files"
            )
        x, y = read_idx(img), read_idx(lab)
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise TensorcutError(
                f"fashion-mnist in {d}: {img.name} and {lab.name} disagree ({x.shape} vs {y.shape})"
            )
        if x.shape[1:] != (28, 28):
            raise TensorcutError(
                f"fashion-mnist in {d}: {img.name} holds {x.shape[1]}x{x.shape[2]} images, "
                "expected 28x28; the files belong to another data set"
            )
        if y.size and y.max() >= 10:
            raise TensorcutError(
                f"fashion-mnist in {d}: {lab.name} has labels outside 0..9; the files belong to "
                "another data set"
            )
        out[split] = (x[:, None].copy(), y.astype(np.int64))
    return out


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Restricted unpickler: only numpy array reconstruction is allowed (CIFAR python batches)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only arrays are accepted")


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            obj = _ArrayOnlyUnpickler(io.BufferedReader(f), encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        LookupError,
        OverflowError,
        MemoryError,
        RecursionError,
    ) as e:  # what random bytes provoke
        raise TensorcutError(
            f"{path} is not a CIFAR python batch ({type(e).__name__}: {str(e)[:80]}); "
            "check --data-dir"
        ) from None
    if not isinstance(obj, dict):
        raise TensorcutError(
            f"{path} is not a CIFAR python batch (top level is {type(obj).__name__}, expected dict)"
        )
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_arrays(batch: dict, label_key: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if "data" not in batch or label_key not in batch:
        raise TensorcutError(
            f"{path} lacks 'data' or '{label_key}'; it is not a CIFAR batch of this data set"
        )
    try:
        xr, y = np.asarray(batch["data"]), np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise TensorcutError(
            f"{path}: 'data' or '{label_key}' is not numeric ({e}); it is not a CIFAR batch"
        ) from None
    if xr.dtype.kind not in "iu" or (xr.size and (xr.min() < 0 or xr.max() > 255)):
        raise TensorcutError(
            f"{path}: 'data' must hold byte pixel values 0..255 (got dtype {xr.dtype}); it is not "
            "a CIFAR batch"
        )
    x = xr.astype(np.uint8)
    if x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != y.shape[0]:
        raise TensorcutError(f"{path}: data has shape {x.shape}, expected (N, 3072) with N labels")
    return x.reshape(-1, 3, 32, 32), y


def _read_cifar_bin(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise TensorcutError(f"cannot read {path}: {e.strerror}; check --data-dir") from None
    rec = label_bytes + 3072
    if raw.size == 0 or raw.size % rec:
        raise TensorcutError(
            f"{path}: size {raw.size} is not a multiple of the {rec}-byte CIFAR record; the file "
            "is truncated or corrupt"
        )
    raw = raw.reshape(-1, rec)
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), raw[:, label_bytes - 1].astype(
        np.int64
    )


def _load_cifar(name: str, data_dir: Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    hint = (
        f"{name} not found: download the python or binary version from the CIFAR page, unpack it, "
        f"and pass --data-dir pointing at the folder (or its parent)"
    )
    if data_dir is None:
        raise TensorcutError(hint)
    root = Path(data_dir)
    is10 = name == "cifar10"
    cands = [
        root,
        root / ("cifar-10-batches-py" if is10 else "cifar-100-python"),
        root / ("cifar-10-batches-bin" if is10 else "cifar-100-binary"),
    ]
    nclass = 10 if is10 else 100
    for d in cands:
        if is10:
            py = [d / f"data_batch_{i}" for i in range(1, 6)]
            if all(p.exists() for p in py) and (d / "test_batch").exists():
                tr = [_cifar_arrays(_read_cifar_pickle(p), "labels", p) for p in py]
                te = _cifar_arrays(_read_cifar_pickle(d / "test_batch"), "labels", d / "test_batch")
                out = {
                    "train": (
                        np.concatenate([a for a, _ in tr]),
                        np.concatenate([b for _, b in tr]),
                    ),
                    "test": te,
                }
                break
            bn = [d / f"data_batch_{i}.bin" for i in range(1, 6)]
            if all(p.exists() for p in bn) and (d / "test_batch.bin").exists():
                tr = [_read_cifar_bin(p, 1) for p in bn]
                out = {
                    "train": (
                        np.concatenate([a for a, _ in tr]),
                        np.concatenate([b for _, b in tr]),
                    ),
                    "test": _read_cifar_bin(d / "test_batch.bin", 1),
                }
                break
        else:
            if (d / "train").exists() and (d / "test").exists() and not (d / "train").is_dir():
                out = {
                    s: _cifar_arrays(_read_cifar_pickle(d / s), "fine_labels", d / s)
                    for s in ("train", "test")
                }
                break
            if (d / "train.bin").exists() and (d / "test.bin").exists():
                out = {s: _read_cifar_bin(d / f"{s}.bin", 2) for s in ("train", "test")}
                break
    else:
        raise TensorcutError(hint.replace("not found", f"not found in {root}"))
    for split, (_, y) in out.items():
        if y.size and (y.min() < 0 or y.max() >= nclass):
            raise TensorcutError(
                f"{name} {split} labels outside 0..{nclass - 1}; these files belong to another "
                "data set"
            )
    return out


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The embedded digits: images ``(1797, 8, 8)`` uint8 with values 0..16 (exactly scikit-learn's
    ``load_digits().images``), labels ``(1797,)`` int64, and ``order``, the fixed permutation whose
    first fifth is the test split (``numpy.random.default_rng(20240321).permutation(1797)``, stored
    so that the split never depends on numpy's generator version)."""
    from importlib import resources

    try:
        with resources.files("tensorcut").joinpath("_data").joinpath(DIGITS_FILE).open("rb") as f:
            with np.load(f, allow_pickle=False) as z:
                images, labels, order = (
                    z["images"],
                    z["labels"].astype(np.int64),
                    z["order"].astype(np.int64),
                )
    except (OSError, KeyError, ValueError) as e:
        raise TensorcutError(
            f"the embedded digits data (tensorcut/_data/{DIGITS_FILE}) is missing or damaged "
            f"({type(e).__name__}); reinstall tensorcut"
        ) from None
    return images, labels, order


def _load_digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    images, y, order = digits_arrays()
    x = (images.astype(np.float64) * (255.0 / 16.0)).round().astype(np.uint8)[:, None]
    n_test = len(y) // 5
    te, tr = order[:n_test], order[n_test:]
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


def _load_synthetic(
    n_train: int = 600, n_test: int = 200, channels: int = 3, size: int = 16, classes: int = 10
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Learnable toy images: one smooth random template per class plus noise."""
    rng = np.random.default_rng(7)
    coarse = rng.normal(size=(classes, channels, 4, 4))
    templates = np.kron(coarse, np.ones((1, 1, size // 4, size // 4)))
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, classes, n)
        x = templates[y] + 0.6 * rng.normal(size=(n, channels, size, size))
        x = np.clip(127.5 + 40 * x, 0, 255).astype(np.uint8)
        out[split] = (x, y.astype(np.int64))
    return out


@lru_cache(maxsize=4)
def _raw(name: str, data_dir: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    d = Path(data_dir) if data_dir else None
    if name == "digits":
        return _load_digits()
    if name == "fashion-mnist":
        return _load_fashion(d)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, d)
    if name == "synthetic":
        return _load_synthetic()
    raise TensorcutError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    subset: int | None = None,
    augment: bool = False,
) -> ImageDataset:
    """Load ``split`` ('train', 'val' or 'test') of data set ``name``, normalised.

    'val' is a seeded ``val_fraction`` of the training set, held out of 'train'.
    Normalisation uses the per-channel mean and std of the training split (after the
    hold-out). ``subset`` keeps a seeded random ``subset`` images of the split; a split that
    holds fewer is used whole, with a warning that gives both numbers (digits' validation split
    has 144 images, so ``subset=200`` there means 144).
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise TensorcutError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise TensorcutError(f"val_fraction must be in [0, 1), got {val_fraction}")
    raw = _raw(name, str(data_dir) if data_dir else None)
    x_tr, y_tr = raw["train"]
    perm = np.random.default_rng(seed).permutation(len(y_tr))
    n_val = int(round(len(y_tr) * val_fraction))
    val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if split == "test":
        x, y = raw["test"]
    elif split == "val":
        if n_val == 0:
            raise TensorcutError("the validation split is empty; use val_fraction > 0")
        x, y = x_tr[val_idx], y_tr[val_idx]
    else:
        x, y = x_tr[tr_idx], y_tr[tr_idx]
    if x.shape[1] != info.in_channels:
        raise TensorcutError(
            f"{name}: images have {x.shape[1]} channels, expected {info.in_channels}; the files "
            "belong to another data set"
        )
    stats_src = x_tr[tr_idx].astype(np.float32) / 255.0
    mean = stats_src.mean(axis=(0, 2, 3))
    std = stats_src.std(axis=(0, 2, 3)) + 1e-6
    if subset is not None:
        if subset < 1:
            raise TensorcutError(f"subset must be >= 1, got {subset}")
        if subset > len(y):
            warnings.warn(
                f"{name} {split} split has {len(y)} images, fewer than the requested subset of "
                f"{subset}; using all {len(y)}",
                stacklevel=2,
            )
        pick = np.sort(np.random.default_rng(seed + 1).permutation(len(y))[:subset])
        x, y = x[pick], y[pick]
    xt = torch.from_numpy(
        (x.astype(np.float32) / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
    )
    flip = name in ("cifar10", "cifar100", "fashion-mnist")
    return ImageDataset(
        xt.contiguous(),
        torch.from_numpy(np.ascontiguousarray(y)),
        augment=augment and split == "train",
        pad=max(1, info.image_size // 16),
        flip=flip,
        seed=seed,
    )


def make_loader(
    ds: Dataset,
    batch_size: int = 128,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A single-process DataLoader with a seeded shuffle (data are already in memory)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last
    )
