"""Export a checkpoint to ONNX, TorchScript or a ``torch.export`` program, and check it.

What is exported is the model prepared for inference (:func:`tensorcut.inference.
prepare_for_inference`): BatchNorm folded into the convolutions that feed it, factorized 1x1
convolutions merged into their cheapest chain, and every 1x1 factor a plain convolution (the
exportable form: one ``Conv`` node per factor, which ONNX Runtime fuses, instead of the eager GEMM
path's reshapes, transposes and ``MatMul``); TorchScript and ``torch.export`` also keep parameters
channels-last. The check compares the exported file with the model as given, so it covers the
preparation too.
"""

from __future__ import annotations

import importlib
import io
import logging
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tensorcut.checkpoint.io import atomic_write_bytes
from tensorcut.errors import TensorcutError

__all__ = [
    "CHECK_BATCHES",
    "FORMATS",
    "ONNX_FIX",
    "Export",
    "export_model",
    "export_with_check",
    "is_export_of",
    "prepared_for_export",
    "require_onnx",
]

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported": "model.pt2"}

#: Batch sizes every export is checked at (the batch dimension is dynamic in every format).
CHECK_BATCHES = (1, 7)

#: The one-line fix for a missing ONNX dependency.
ONNX_FIX = "pip install 'tensorcut[onnx]'"

log = logging.getLogger("tensorcut.export")


@dataclass(frozen=True)
class Export:
    """An export: the file written, whether it was run and compared with PyTorch, and how."""

    path: Path
    checked: bool
    note: str  # 'outputs checked against PyTorch at batch 1 and 7' or 'not checked: <why>'


def require_onnx() -> None:
    """Refuse at once, in one line, when the ``onnx`` package (needed to write ONNX) is missing."""
    if not _importable("onnx"):
        raise TensorcutError(
            f"ONNX export needs the onnx package, which is not installed; {ONNX_FIX}"
        )


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def export_model(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    fmt: str,
    out: str | Path,
    check: bool = True,
    atol: float = 1e-4,
    prepare: bool = True,
) -> Path:
    """Write ``model`` in format ``fmt`` to file ``out`` (atomically).

    ``fmt`` is 'onnx', 'torchscript' or 'exported'.

    See :func:`export_with_check`; an export that could not be checked is logged as a warning.
    """
    e = export_with_check(model, input_shape, fmt, out, check=check, atol=atol, prepare=prepare)
    if check and not e.checked:
        log.warning("%s: %s", e.path, e.note)
    return e.path


def export_with_check(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    fmt: str,
    out: str | Path,
    check: bool = True,
    atol: float = 1e-4,
    prepare: bool = True,
) -> Export:
    """Write ``model`` in format ``fmt`` to ``out`` atomically, with a dynamic batch dimension.

    With ``check``, the exported artefact is run at batch sizes :data:`CHECK_BATCHES` and
    compared with the PyTorch output; a mismatch above ``atol`` is an error. ONNX is run
    through onnxruntime when it is installed, and otherwise reported as *not checked* (never
    claimed). ONNX uses the TorchScript-based exporter with a dynamic batch axis; ``torch.export``
    marks the batch dimension dynamic; a TorchScript trace of these models is batch-agnostic
    (the check at two batch sizes verifies it). ``prepare`` (default) exports
    :func:`prepared_for_export` of ``model``; the check compares with ``model`` itself.
    """
    if fmt not in FORMATS:
        raise TensorcutError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    out = Path(out)
    model = model.eval().cpu().float()
    x = torch.randn(2, *input_shape)
    checks = [torch.randn(b, *input_shape) for b in CHECK_BATCHES]
    with torch.no_grad():
        refs = [model(xb) for xb in checks]
    if prepare:
        model = prepared_for_export(model, fmt)
    done = f"outputs checked against PyTorch at batch {' and '.join(map(str, CHECK_BATCHES))}"
    note = done if check else "not checked: check=False"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            buf = io.BytesIO()
            torch.onnx.export(
                model,
                (x,),
                # torch annotates `f` as a path; the TorchScript exporter also takes a file object
                buf,  # type: ignore[arg-type]
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
            )
            data = buf.getvalue()
            atomic_write_bytes(out, data)
            if check:
                if _importable("onnxruntime"):
                    _check_onnx(data, checks, refs, atol)
                else:
                    note = f"not checked: onnxruntime not installed ({ONNX_FIX})"
        elif fmt == "torchscript":
            scripted = torch.jit.trace(model, (x,))
            buf = io.BytesIO()
            torch.jit.save(scripted, buf)
            atomic_write_bytes(out, buf.getvalue())
            if check:
                loaded = torch.jit.load(io.BytesIO(buf.getvalue()))
                with torch.no_grad():
                    for xb, ref in zip(checks, refs, strict=True):
                        _compare(loaded(xb), ref, atol, f"TorchScript (batch {len(xb)})")
        else:
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            prog = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
            with tempfile.TemporaryDirectory() as td:
                p = Path(td) / "m.pt2"
                torch.export.save(prog, p)
                atomic_write_bytes(out, p.read_bytes())
                if check:
                    loaded = torch.export.load(p).module()
                    with torch.no_grad():
                        for xb, ref in zip(checks, refs, strict=True):
                            _compare(loaded(xb), ref, atol, f"torch.export (batch {len(xb)})")
    return Export(out, check and note == done, note)


def prepared_for_export(model: nn.Module, fmt: str) -> nn.Module:
    """The form of ``model`` that format ``fmt`` exports: prepared for inference with 1x1 factors
    as plain convolutions, parameters channels-last except for ONNX (whose graph has no memory
    format). ``model`` itself is not changed."""
    from tensorcut.inference import prepare_for_inference

    return prepare_for_inference(model, pointwise="conv", channels_last=fmt != "onnx")


def is_export_of(path: str | Path, fmt: str) -> bool:
    """Whether file ``path`` is an earlier export in format ``fmt``.

    Such a file may be replaced by re-exporting.
    """
    p = Path(path)
    try:
        if fmt == "onnx":
            if not _importable("onnx"):
                return False
            import onnx

            m = onnx.load(str(p), load_external_data=False)
            return bool(m.graph.node) and [i.name for i in m.graph.input][:1] == ["input"]
        if not zipfile.is_zipfile(p):
            return False
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
        if fmt == "torchscript":
            return any(n.endswith("/constants.pkl") for n in names) and any(
                "/code/" in n for n in names
            )
        return any(n.endswith("archive_format") for n in names)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not an earlier export
        return False


def _compare(got: torch.Tensor, ref: torch.Tensor, atol: float, what: str) -> None:
    if got.shape != ref.shape:
        raise TensorcutError(
            f"{what} output has shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}; "
            "please report this model"
        )
    err = float((got - ref).abs().max())
    if err > atol:
        raise TensorcutError(
            f"{what} output differs from PyTorch by {err:.2e} (> {atol}); please report this model"
        )


def _check_onnx(
    data: bytes, checks: list[torch.Tensor], refs: list[torch.Tensor], atol: float
) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for xb, ref in zip(checks, refs, strict=True):
        got = sess.run(None, {"input": xb.numpy()})[0]
        _compare(torch.from_numpy(got), ref, atol, f"ONNX (onnxruntime, batch {len(xb)})")
