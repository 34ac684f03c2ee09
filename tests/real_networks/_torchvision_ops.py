"""Let torchvision's pure-Python model code import beside a CPU-only torch wheel (test helper, not
part of tensorcut).

The torchvision wheel on the package registry is a CUDA build: its compiled extension
(``_C_stable.so``) does not load beside the CPU torch wheel, and ``import torchvision`` then fails
while registering fake kernels for operators that were never defined (``torchvision::nms``, ...).
Nothing in the real-architecture tests runs those operators (they are detection ops: NMS, RoI
align/pool, deformable conv); the model definitions only need the operator *schemas* to exist.

:func:`ensure_torchvision_ops` defines them with :mod:`torch.library` when (and only when) the
extension cannot provide them, so the same tests run unchanged on a machine with a matching
torchvision build. timm imports torchvision, so call it before importing either:

    from _torchvision_ops import import_model_libraries
    timm, torchvision = import_model_libraries()   # skips the test when either is missing

Install the two into the test environment (their model code is pure Python)::

    .venv/bin/pip install --no-deps timm torchvision
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["INSTALL_HINT", "SCHEMAS", "ensure_torchvision_ops", "import_model_libraries"]

INSTALL_HINT = "install the model zoos with: .venv/bin/pip install --no-deps timm torchvision"

#: The operator schemas torchvision registers from its C++ extension (torchvision/csrc/ops/*.cpp).
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt "
    "pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, int "
    "sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt "
    "pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt "
    "channels, SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt "
    "pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt "
    "pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt "
    "width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt "
    "pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt "
    "pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt "
    "stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, "
    "Tensor, Tensor, Tensor)",
    "_cuda_version() -> int",
)

#: The stub library; kept referenced for the life of the process (dropping it unregisters the
#: schemas).
_LIBRARY: torch.library.Library | None = None


def _ops_defined() -> bool:
    return hasattr(torch.ops.torchvision, "nms")


def _extension_loads() -> bool:
    """Whether torchvision's own compiled extension loads here (then it defines the schemas)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for root in spec.submodule_search_locations:
        for lib in sorted(Path(root).glob("_C*.so")) + sorted(Path(root).glob("_C*.pyd")):
            try:
                torch.ops.load_library(str(lib))
            except (OSError, RuntimeError, ImportError):
                continue
            if _ops_defined():
                return True
    return False


def ensure_torchvision_ops() -> bool:
    """Make ``torchvision::`` operator schemas exist before torchvision is imported.

    Returns True when stubs were defined here, False when they already existed (torchvision already
    imported, or its extension loads). Idempotent.
    """
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules or _ops_defined() or _extension_loads():
        return False
    lib = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        lib.define(schema)
    _LIBRARY = lib
    return True


def import_model_libraries() -> tuple[ModuleType, ModuleType]:
    """``(timm, torchvision)``, imported after :func:`ensure_torchvision_ops`. Under pytest a
    missing package skips the calling test with the install command; elsewhere it raises
    ImportError."""
    missing = [n for n in ("timm", "torchvision") if importlib.util.find_spec(n) is None]
    if missing:
        _unavailable(f"{' and '.join(missing)} not installed; {INSTALL_HINT}")
    ensure_torchvision_ops()
    try:
        return importlib.import_module("timm"), importlib.import_module("torchvision")
    except ImportError as e:
        _unavailable(f"timm / torchvision do not import ({e}); {INSTALL_HINT}")
        raise  # not reached: _unavailable raises


def _unavailable(msg: str) -> None:
    if "pytest" in sys.modules:
        import pytest

        pytest.skip(msg)
    raise ImportError(msg)
