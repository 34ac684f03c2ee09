"""Export a checkpoint to ONNX, TorchScript or a ``torch.export`` program, and check it."""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.io import atomic_write_bytes

__all__ = ["FORMATS", "export_model"]

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported": "model.pt2"}


def export_model(model: nn.Module, input_shape: tuple[int, int, int], fmt: str, out: str | Path,
                 check: bool = True, atol: float = 1e-4) -> Path:
    """Write ``model`` in format ``fmt`` ('onnx', 'torchscript', 'exported') to file ``out`` (atomically).

    With ``check``, the exported artefact is run on random inputs and compared with the
    PyTorch output (ONNX through onnxruntime when it is installed); a mismatch above
    ``atol`` is an error. ONNX uses the TorchScript-based exporter with a dynamic batch axis.
    """
    if fmt not in FORMATS:
        raise TensorcutError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = Path(out)
    model = model.eval().cpu().float()
    x = torch.randn(2, *input_shape)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            buf = io.BytesIO()
            torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
            data = buf.getvalue()
            atomic_write_bytes(out, data)
            if check:
                _check_onnx(data, x, ref, atol)
        elif fmt == "torchscript":
            scripted = torch.jit.trace(model, (x,))
            buf = io.BytesIO()
            torch.jit.save(scripted, buf)
            atomic_write_bytes(out, buf.getvalue())
            if check:
                got = torch.jit.load(io.BytesIO(buf.getvalue()))(x)
                _compare(got, ref, atol, "TorchScript")
        else:
            prog = torch.export.export(model, (x,))
            with tempfile.TemporaryDirectory() as td:
                p = Path(td) / "m.pt2"
                torch.export.save(prog, p)
                atomic_write_bytes(out, p.read_bytes())
                if check:
                    got = torch.export.load(p).module()(x)
                    _compare(got, ref, atol, "torch.export")
    return out


def _compare(got: torch.Tensor, ref: torch.Tensor, atol: float, what: str) -> None:
    err = float((got - ref).abs().max())
    if err > atol:
        raise TensorcutError(f"{what} output differs from PyTorch by {err:.2e} (> {atol}); please report this model")


def _check_onnx(data: bytes, x: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        return
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    _compare(torch.from_numpy(got), ref, atol, "ONNX (onnxruntime)")
