"""Export: a dynamic batch dimension in every format, honest check notes, refusals before work."""

from __future__ import annotations

import copy
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tensorcut import models
from tensorcut.cli import main
from tensorcut.compression import compress
from tensorcut.export import CHECK_BATCHES, FORMATS, ONNX_FIX, export_with_check, is_export_of

pytestmark = pytest.mark.filterwarnings("ignore")

SHAPE = (3, 16, 16)


def _tol(ref: torch.Tensor) -> float:
    # Another runtime reorders the float32 sums of each conv (fan-in <= 9 * 64 here) through ~20
    # layers: a few hundred float32 roundings of the output's magnitude, far above them is a real
    # mismatch.
    return 1e3 * torch.finfo(torch.float32).eps * max(1.0, float(ref.abs().max()))


@pytest.fixture(scope="module")
def zoo_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = models.create(
        "resnet20", num_classes=10, in_channels=3, input_size=16, width=0.25
    ).eval()
    small, _ = compress(
        copy.deepcopy(dense), method="tucker2", ratio=0.5, input_shape=SHAPE, progress=False
    )
    return {"dense": dense, "tucker2": small.eval()}


def _run_export(path: Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file with its own runtime (not tensorcut's check)."""
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        if fmt == "torchscript":
            return torch.jit.load(str(path))(x)
        return torch.export.load(str(path)).module()(x)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("which", ["dense", "tucker2"])
def test_every_format_takes_batch_1_and_7(
    zoo_models: dict[str, nn.Module], tmp_path: Path, fmt: str, which: str
) -> None:
    model = zoo_models[which]
    e = export_with_check(model, SHAPE, fmt, tmp_path / FORMATS[fmt])
    assert e.checked and e.note == "outputs checked against PyTorch at batch 1 and 7"
    assert CHECK_BATCHES == (1, 7)
    assert is_export_of(e.path, fmt)
    for b in (1, 7):
        x = torch.randn(b, *SHAPE)
        with torch.no_grad():
            ref = model(x)
        got = _run_export(e.path, fmt, x)
        assert got.shape == ref.shape == (b, 10)
        assert float((got - ref).abs().max()) <= _tol(ref)


def test_export_is_the_prepared_model_and_equals_the_compressed_one(
    zoo_models: dict[str, nn.Module], tmp_path: Path
) -> None:
    """BatchNorm folded, 1x1 factors as plain convolutions (no GEMM reshapes), same outputs."""
    from collections import Counter

    from tensorcut.export import prepared_for_export

    model = zoo_models["tucker2"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convs = sum(isinstance(m, nn.Conv2d) for m in prepared_for_export(model, "onnx").modules())
    assert convs > sum(isinstance(m, nn.Conv2d) for m in model.modules()) // 2
    ts = export_with_check(model, SHAPE, "torchscript", tmp_path / "m.pt")
    ops = Counter(n.kind() for n in torch.jit.load(str(ts.path)).inlined_graph.nodes())
    assert ops["aten::_convolution"] == convs
    assert ops["aten::batch_norm"] == ops["aten::bmm"] == ops["aten::matmul"] == 0
    onnx = pytest.importorskip("onnx")
    e = export_with_check(model, SHAPE, "onnx", tmp_path / "m.onnx", check=False)
    kinds = Counter(n.op_type for n in onnx.load(str(e.path)).graph.node)
    assert kinds["Conv"] == convs and kinds["BatchNormalization"] == kinds["MatMul"] == 0
    for path, fmt in ((ts.path, "torchscript"), (e.path, "onnx")):
        for b in (1, 7):
            x = torch.randn(b, *SHAPE)
            with torch.no_grad():
                ref = model(x)
            got = _run_export(path, fmt, x)
            assert got.shape == ref.shape and float((got - ref).abs().max()) <= _tol(ref)
    after = model.state_dict()  # the caller's model is not changed by the preparation
    assert before.keys() == after.keys()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_onnx_without_onnxruntime_says_not_checked(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    out = tmp_path / "m.onnx"
    assert main(["export", str(tiny_checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "not checked: onnxruntime not installed (pip install 'tensorcut[onnx]')" in text
    assert "outputs checked" not in text and out.stat().st_size > 0


def _one_line(capsys: Any, verb: str, *needles: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tensorcut {verb}: error: "), err
    for n in needles:
        assert n in err[0], err[0]


@pytest.mark.parametrize("verb", ["export", "demo", "run", "run-train"])
def test_missing_onnx_stops_at_once(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: Any, capsys: Any, verb: str
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    out = tmp_path / "o"
    argv = {
        "export": ["export", str(tiny_checkpoint), "--format", "onnx", "--out", str(out)],
        "demo": ["demo", "--out", str(out), "--fast"],
        "run": ["run", str(tiny_checkpoint), "--target-ratio", "3", "--out", str(out)],
        "run-train": [
            "run",
            "--model",
            "vanilla-cnn",
            "--dataset",
            "digits",
            "--target-ratio",
            "3",
            "--out",
            str(out),
        ],
    }[verb]
    assert main(argv) == 2
    _one_line(capsys, argv[0], "onnx package", ONNX_FIX)
    assert not out.exists()  # stopped before any training or writing


def test_out_onto_the_checkpoints_own_files_is_refused(
    tiny_checkpoint: Path, tmp_path: Path, capsys: Any
) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    for f in tiny_checkpoint.iterdir():
        (ck / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in ck.iterdir()}
    for name in ("model.safetensors", "meta.json"):
        assert (
            main(["export", str(ck), "--format", "torchscript", "--out", str(ck / name), "--force"])
            == 2
        )
        _one_line(capsys, "export", "is a file of the checkpoint itself")
    assert {f.name: f.read_bytes() for f in ck.iterdir()} == before


def test_existing_file_needs_force_but_an_earlier_export_is_replaced(
    tiny_checkpoint: Path, tmp_path: Path, capsys: Any
) -> None:
    notes = tmp_path / "notes.pt"
    notes.write_text("my notes")
    assert (
        main(["export", str(tiny_checkpoint), "--format", "torchscript", "--out", str(notes)]) == 2
    )
    _one_line(capsys, "export", "is not an earlier torchscript export", "--force")
    assert notes.read_text() == "my notes"
    assert (
        main(
            [
                "export",
                str(tiny_checkpoint),
                "--format",
                "torchscript",
                "--out",
                str(notes),
                "--force",
            ]
        )
        == 0
    )
    assert (
        main(["export", str(tiny_checkpoint), "--format", "torchscript", "--out", str(notes)]) == 0
    )  # re-export
    torch.jit.load(str(notes))
    ex = tmp_path / "m.pt2"
    assert main(["export", str(tiny_checkpoint), "--format", "exported", "--out", str(ex)]) == 0
    assert not is_export_of(ex, "torchscript") and is_export_of(ex, "exported")
    assert (
        main(["export", str(tiny_checkpoint), "--format", "torchscript", "--out", str(ex)]) == 2
    )  # other format
    capsys.readouterr()


def test_export_json(tiny_checkpoint: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "m.pt"
    assert (
        main(
            ["export", str(tiny_checkpoint), "--format", "torchscript", "--out", str(out), "--json"]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r == {
        "format": "torchscript",
        "path": str(out),
        "checked": True,
        "check": "outputs checked against PyTorch at batch 1 and 7",
    }
    assert torch.jit.load(io.BytesIO(out.read_bytes()))(torch.randn(3, 1, 8, 8)).shape == (3, 10)
