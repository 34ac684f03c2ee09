"""Property and fuzz tests (hypothesis), derandomised so CI sees the same examples every run.

* Full-rank equivalence: for random conv hyper-parameters (channels, kernel shape, stride,
  padding of every kind, dilation, padding mode, bias, groups) every layer class in
  ``LAYER_REGISTRY``, built at its ``max_ranks``, computes what the dense ``nn.Conv2d``
  computes. A class may refuse a grouped or depthwise conv, but only with a TensorcutError
  that names the reason.
* Fuzz: random and mutated bytes fed to every reader of user files — checkpoint weights
  and ``meta.json``, the training state, IDX files, CIFAR python and binary batches, the
  results store — end in a TensorcutError (or a valid result), never another exception.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import tensorcut.layers  # noqa: F401  (registers every layer class)
from tensorcut import data as tdata
from tensorcut.checkpoint import io as tio
from tensorcut.errors import TensorcutError
from tensorcut.geometry import ConvGeometry
from tensorcut.layers.base import LAYER_REGISTRY

METHODS = sorted(LAYER_REGISTRY)
PROPERTY = settings(
    max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# ---------------------------------------------------------------------------- full-rank equivalence


@st.composite
def conv_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A small but arbitrary Conv2d and an input it accepts."""
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding: Any = draw(
        st.one_of(
            st.integers(0, 2),
            st.tuples(st.integers(0, 2), st.integers(0, 2)),
            st.sampled_from(["same", "valid"]),
        )
    )
    if padding == "same":
        stride = (1, 1)  # PyTorch refuses 'same' with strides
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    h, w = draw(st.integers(4, 9)), draw(st.integers(4, 9))
    return {
        "in_channels": cin,
        "out_channels": cout,
        "kernel_size": (kh, kw),
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "padding_mode": mode,
        "bias": draw(st.booleans()),
        "groups": groups,
        "hw": (h, w),
        "seed": draw(st.integers(0, 2**16)),
    }


def _dense(cfg: dict[str, Any]) -> tuple[nn.Conv2d, torch.Tensor] | None:
    kw = {k: v for k, v in cfg.items() if k not in ("hw", "seed")}
    torch.manual_seed(cfg["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = nn.Conv2d(**kw).double()
    with torch.no_grad():
        if conv.bias is not None:
            conv.bias.normal_()
    x = torch.randn(2, cfg["in_channels"], *cfg["hw"], dtype=torch.float64)
    try:
        conv(x)
    except (
        RuntimeError
    ):  # kernel larger than the padded input, or reflect padding wider than the input
        return None
    return conv, x


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("method", METHODS)
@PROPERTY
@given(cfg=conv_configs())
def test_every_layer_class_is_exact_at_full_rank(method: str, cfg: dict[str, Any]) -> None:
    built = _dense(cfg)
    assume(built is not None)
    conv, x = built  # type: ignore[misc]
    cls = LAYER_REGISTRY[method]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = cls.from_conv(conv, cls.max_ranks(ConvGeometry.from_conv(conv)))  # type: ignore[attr-defined]
    except TensorcutError as e:
        assert conv.groups > 1 and ("groups" in str(e) or "depthwise" in str(e)), str(e)
        return
    with torch.no_grad():
        ref, got = conv(x), layer(x)
        assert got.shape == ref.shape
        scale = float(ref.abs().max().clamp_min(1.0))
        assert float((got - ref).abs().max()) <= 1e-9 * scale
        rec = layer.reconstruct_weight()
        assert float((rec - conv.weight).abs().max()) <= 1e-9 * float(
            conv.weight.abs().max().clamp_min(1.0)
        )


# ----------------------------------------------------------------------------- fuzz: checkpoints


@pytest.fixture(scope="module")
def good_checkpoint(tiny_checkpoint: Path) -> tuple[bytes, dict[str, Any]]:
    return (tiny_checkpoint / "model.safetensors").read_bytes(), json.loads(
        (tiny_checkpoint / "meta.json").read_text()
    )


def _loads_or_refuses(d: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tio.load_checkpoint(d)
        except TensorcutError as e:
            assert "\n" not in str(e)


@FUZZ
@given(data=st.binary(max_size=2000))
def test_fuzz_random_bytes_as_weights(
    tmp_path: Path, good_checkpoint: tuple[bytes, dict[str, Any]], data: bytes
) -> None:
    d = tmp_path / "ck"
    d.mkdir(exist_ok=True)
    (d / "meta.json").write_text(json.dumps(good_checkpoint[1]))
    (d / "model.safetensors").write_bytes(data)
    with pytest.raises(TensorcutError):
        tio.load_checkpoint(d)


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10**9)),
)
def test_fuzz_mutated_weights(
    tmp_path: Path,
    good_checkpoint: tuple[bytes, dict[str, Any]],
    flips: list[tuple[int, int]],
    cut: int | None,
) -> None:
    raw = bytearray(good_checkpoint[0])
    for pos, val in flips:
        raw[pos % len(raw)] = val
    if cut is not None:
        raw = raw[: cut % len(raw)]
    d = tmp_path / "ck"
    d.mkdir(exist_ok=True)
    (d / "meta.json").write_text(json.dumps(good_checkpoint[1]))
    (d / "model.safetensors").write_bytes(bytes(raw))
    _loads_or_refuses(d)


JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**12), 10**12),
        st.floats(allow_nan=False),
        st.text(max_size=8),
    ),
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.dictionaries(
            st.sampled_from(
                ["name", "kwargs", "width", "method", "ranks", "geometry", "num_classes", "x"]
            ),
            kids,
            max_size=3,
        ),
    ),
    max_leaves=8,
)


@FUZZ
@given(
    where=st.sampled_from(["kwargs", "kwarg", "layers", "layer", "model", "name", "top"]),
    value=JSON,
    key=st.sampled_from(
        ["width", "num_classes", "in_channels", "input_size", "conv_dropout", "zz"]
    ),
)
def test_fuzz_hand_edited_meta_json(
    tmp_path: Path, good_checkpoint: tuple[bytes, dict[str, Any]], where: str, value: Any, key: str
) -> None:
    meta = json.loads(json.dumps(good_checkpoint[1]))
    if where == "kwargs":
        meta["model"]["kwargs"] = value
    elif where == "kwarg":
        meta["model"]["kwargs"][key] = value
    elif where == "layers":
        meta["layers"] = value
    elif where == "layer":
        meta["layers"] = {"conv2": value}
    elif where == "model":
        meta["model"] = value
    elif where == "name":
        meta["model"]["name"] = value
    else:
        meta = value
    d = tmp_path / "ck"
    d.mkdir(exist_ok=True)
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "model.safetensors").write_bytes(good_checkpoint[0])
    _loads_or_refuses(d)


@FUZZ
@given(data=st.binary(max_size=600), zipped=st.booleans())
def test_fuzz_training_state(tmp_path: Path, data: bytes, zipped: bool) -> None:
    from tensorcut.train.callbacks import load_train_state

    p = tmp_path / "train_state.pt"
    p.write_bytes((b"PK\x03\x04" if zipped else b"") + data)
    with pytest.raises(TensorcutError):
        load_train_state(p, torch.device("cpu"))


# ----------------------------------------------------------------------------- fuzz: data readers


@FUZZ
@given(
    head=st.sampled_from(
        [b"", b"\x00\x00\x08\x01", b"\x00\x00\x08\x03", b"\x00\x00\x08\x02", b"\x1f\x8b"]
    ),
    data=st.binary(max_size=300),
)
def test_fuzz_idx_reader(tmp_path: Path, head: bytes, data: bytes) -> None:
    p = tmp_path / "f-idx3-ubyte"
    p.write_bytes(head + data)
    try:
        arr = tdata.read_idx(p)
    except TensorcutError:
        return
    assert arr.dtype == np.uint8 and arr.ndim in (1, 3)


@FUZZ
@given(
    head=st.sampled_from([b"", b"\x80\x02", b"\x80\x04\x95"]),
    data=st.binary(max_size=300),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
)
def test_fuzz_cifar_python_batch(
    tmp_path: Path, head: bytes, data: bytes, flips: list[tuple[int, int]]
) -> None:
    good = bytearray(
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}, protocol=2)
    )
    for pos, val in flips:
        good[pos % len(good)] = val
    p = tmp_path / "data_batch_1"
    for payload in (head + data, bytes(good)):
        p.write_bytes(payload)
        try:
            batch = tdata._read_cifar_pickle(p)
            tdata._cifar_arrays(batch, "labels", p)
        except TensorcutError:
            pass


@FUZZ
@given(data=st.binary(max_size=7000))
def test_fuzz_cifar_binary_batch(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "data_batch_1.bin"
    p.write_bytes(data)
    try:
        x, y = tdata._read_cifar_bin(p, 1)
    except TensorcutError:
        return
    assert x.shape[1:] == (3, 32, 32) and len(x) == len(y)


@FUZZ
@given(data=st.binary(min_size=1, max_size=2000), sqlite_header=st.booleans())
def test_fuzz_results_store(tmp_path: Path, data: bytes, sqlite_header: bool) -> None:
    from tensorcut.study.store import ResultsStore

    p = tmp_path / "r.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(str(p) + suffix).unlink(missing_ok=True)
    p.write_bytes((b"SQLite format 3\x00" if sqlite_header else b"") + data)
    before = p.read_bytes()
    with pytest.raises(TensorcutError):
        ResultsStore(p).close()
    assert p.read_bytes() == before  # a foreign file is reported, never overwritten


def test_fuzz_whole_checkpoint_directory_through_the_cli(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sanity for the fuzzers above: the CLI turns the same refusals into one line and exit 2."""
    from tensorcut.cli import main

    d = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, d)
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    assert main(["inspect", str(d)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
