"""Data sets: each on-disk format read from small generated files; splits; bad files."""

import hashlib
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from formats_util import pickle_dump, write_idx

from tensorcut import data
from tensorcut.errors import TensorcutError


def test_digits_splits_are_disjoint_and_seeded():
    tr = data.load_dataset("digits", "train")
    va = data.load_dataset("digits", "val")
    te = data.load_dataset("digits", "test")
    assert tr.images.shape[1:] == (1, 8, 8)
    assert len(tr) + len(va) + len(te) == 1797
    assert len(va) == round((len(tr) + len(va)) * 0.1)
    again = data.load_dataset("digits", "val")
    assert torch.equal(va.images, again.images)
    other = data.load_dataset("digits", "val", seed=1)
    assert not torch.equal(va.images, other.images)
    assert abs(float(tr.images.mean())) < 0.05 and abs(float(tr.images.std()) - 1) < 0.1


# Content hashes of the fixed digits splits (integer pixel values and labels: exact, the same on
# every machine), taken from the scikit-learn-based loader the embedded file replaced.
DIGITS_SPLIT_SHA256 = {
    "train": "edfc9935dd17f576d96a07100aae2ecbaa1b307ed719f941ec70874594f7593a",
    "test": "ee5a44f4706a68dfb9f1a0447c50e198de21989f36839b4dd3c145f26cc83dfe",
}


def _sha(x: np.ndarray, y: np.ndarray) -> str:
    return hashlib.sha256(x.tobytes() + y.astype(np.int64).tobytes()).hexdigest()


def test_embedded_digits_equal_scikit_learns_and_keep_the_old_split():
    """The shipped arrays are scikit-learn's; the splits are the scikit-learn-based loader's."""
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    images, labels, order = data.digits_arrays()
    assert images.dtype == np.uint8 and np.array_equal(images.astype(np.float64), d.images)
    assert np.array_equal(labels, d.target)
    # the loader before the file was embedded, verbatim
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(20240321).permutation(len(y))
    n_test = len(y) // 5
    old = {
        "train": (x[perm[n_test:]], y[perm[n_test:]]),
        "test": (x[perm[:n_test]], y[perm[:n_test]]),
    }
    new = data._raw("digits", None)
    for split in ("train", "test"):
        assert np.array_equal(new[split][0], old[split][0]) and np.array_equal(
            new[split][1], old[split][1]
        ), split


def test_digits_need_no_scikit_learn_and_the_split_is_fixed(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn...` now fails
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    data._raw.cache_clear()
    try:
        raw = data._raw("digits", None)
        assert {s: _sha(*raw[s]) for s in ("train", "test")} == DIGITS_SPLIT_SHA256
        _, _, order = data.digits_arrays()
        assert sorted(order.tolist()) == list(
            range(1797)
        )  # a permutation: every image in exactly one split
        assert len(data.load_dataset("digits", "test")) == 359
    finally:
        data._raw.cache_clear()


def test_subset_larger_than_the_split_warns_with_both_numbers():
    """digits' validation split has 144 images: ``subset=200`` cannot mean 200 there; it says so."""
    with pytest.warns(
        UserWarning,
        match=r"digits val split has 144 images, fewer than the requested subset of 200; "
        r"using all 144",
    ):
        va = data.load_dataset("digits", "val", subset=200)
    assert len(va) == 144
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a subset the split can hold: exactly that many, silently
        assert len(data.load_dataset("digits", "train", subset=200)) == 200
        assert len(data.load_dataset("digits", "val", subset=144)) == 144


def test_val_split_is_held_out_of_train():
    tr = data.load_dataset("synthetic", "train", val_fraction=0.25)
    va = data.load_dataset("synthetic", "val", val_fraction=0.25)
    assert len(tr) == 450 and len(va) == 150
    rows = {x.numpy().tobytes() for x in tr.images}
    assert all(x.numpy().tobytes() not in rows for x in va.images)


def test_subset_and_augmentation_shapes():
    ds = data.load_dataset("synthetic", "train", subset=32, augment=True)
    assert len(ds) == 32
    x0, y0 = ds[0]
    assert x0.shape == (3, 16, 16) and y0.dtype == torch.int64
    assert not torch.equal(ds[0][0], ds[0][0]) or not torch.equal(ds[1][0], ds[1][0])


def test_fashion_mnist_idx(fashion_dir):
    tr = data.load_dataset("fashion-mnist", "train", data_dir=fashion_dir, val_fraction=0.2)
    te = data.load_dataset("fashion-mnist", "test", data_dir=fashion_dir)
    assert tr.images.shape == (40, 1, 28, 28) and te.images.shape == (20, 1, 28, 28)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(
        TensorcutError, match=r"apt-get install -y dataset-fashion-mnist.*--data-dir"
    ):
        data.load_dataset("fashion-mnist", data_dir=tmp_path / "empty")


def test_idx_wrong_magic_and_truncated(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(TensorcutError, match="bad magic number"):
        data.read_idx(p)
    write_idx(tmp_path / "y", np.zeros((3, 4, 4)), gz=False)
    q = tmp_path / "y"
    q.write_bytes(q.read_bytes()[:-5])
    with pytest.raises(TensorcutError, match="truncated or corrupt"):
        data.read_idx(q)


def _cifar_py(root: Path, n: int = 4, hundred: bool = False) -> Path:
    rng = np.random.default_rng(0)
    if hundred:
        d = root / "cifar-100-python"
        d.mkdir()
        for s in ("train", "test"):
            pickle_dump(
                {
                    b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                    b"fine_labels": rng.integers(0, 100, n).tolist(),
                    b"coarse_labels": [0] * n,
                },
                d / s,
            )
        return root
    d = root / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pickle_dump(
            {
                b"batch_label": b"x",
                b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                b"labels": rng.integers(0, 10, n).tolist(),
            },
            d / name,
        )
    return root


def test_cifar10_python_batches(tmp_path):
    root = _cifar_py(tmp_path)
    tr = data.load_dataset("cifar10", "train", data_dir=root, val_fraction=0.1)
    assert tr.images.shape == (18, 3, 32, 32)
    assert len(data.load_dataset("cifar10", "test", data_dir=root)) == 4


def test_cifar100_python(tmp_path):
    root = _cifar_py(tmp_path, hundred=True)
    assert len(data.load_dataset("cifar100", "test", data_dir=root)) == 4


def test_cifar_binary_versions(tmp_path):
    rng = np.random.default_rng(0)
    d10 = tmp_path / "cifar-10-batches-bin"
    d10.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = np.concatenate(
            [rng.integers(0, 10, (3, 1)), rng.integers(0, 256, (3, 3072))], 1
        ).astype(np.uint8)
        rec.tofile(d10 / name)
    te = data.load_dataset("cifar10", "test", data_dir=tmp_path)
    assert te.images.shape == (3, 3, 32, 32)
    d100 = tmp_path / "c100" / "cifar-100-binary"
    d100.mkdir(parents=True)
    for name in ("train.bin", "test.bin"):
        rec = np.concatenate(
            [
                rng.integers(0, 20, (5, 1)),
                rng.integers(0, 100, (5, 1)),
                rng.integers(0, 256, (5, 3072)),
            ],
            1,
        ).astype(np.uint8)
        rec.tofile(d100 / name)
    te = data.load_dataset("cifar100", "test", data_dir=tmp_path / "c100")
    assert len(te) == 5 and int(te.labels.max()) < 100


def test_cifar_pickle_with_foreign_object_is_refused(tmp_path):
    root = _cifar_py(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pickle_dump(Evil(), root / "cifar-10-batches-py" / "test_batch")
    data._raw.cache_clear()
    with pytest.raises(
        TensorcutError,
        match=r"refusing to load (__builtin__|builtins)\.print: only arrays are accepted",
    ):
        data.load_dataset("cifar10", "test", data_dir=root)


def test_cifar_truncated_binary(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        np.zeros(3073 * 2 - 7, np.uint8).tofile(d / name)
    with pytest.raises(TensorcutError, match="not a multiple of the 3073-byte CIFAR record"):
        data.load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar_absent(tmp_path):
    with pytest.raises(TensorcutError, match="cifar10 not found in .*--data-dir"):
        data.load_dataset("cifar10", data_dir=tmp_path)


def test_unknown_dataset_and_split():
    with pytest.raises(
        TensorcutError,
        match="unknown dataset 'mnist'; "
        "choose one of: cifar10, cifar100, digits, fashion-mnist, synthetic",
    ):
        data.load_dataset("mnist")
    with pytest.raises(TensorcutError, match="unknown split 'dev'"):
        data.load_dataset("digits", "dev")
