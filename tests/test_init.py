"""The package face (tensorcut/__init__.py): the names the design promises, one meaning each,
documented with Args / Returns / Raises / Example, and no CLI behind the Python API."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import tensorcut as tc

FACE = (
    "compress",
    "plan",
    "apply",
    "decompress",
    "CompressConfig",
    "Plan",
    "list_methods",
    "create_model",
    "list_models",
    "fit",
    "FitConfig",
    "evaluate",
    "analyze",
    "load",
    "save",
    "TensorcutError",
)


def test_the_face_is_exported() -> None:
    assert set(FACE) <= set(tc.__all__)
    for name in tc.__all__:
        assert hasattr(tc, name), name


@pytest.mark.parametrize("name", FACE)
def test_each_name_is_documented(name: str) -> None:
    doc = inspect.getdoc(getattr(tc, name)) or ""
    assert "Example:" in doc, f"tensorcut.{name}: no Example"
    obj = getattr(tc, name)
    if inspect.isfunction(obj):
        assert "Returns:" in doc, f"tensorcut.{name}: no Returns"
        assert "Raises:" in doc, f"tensorcut.{name}: no Raises"
        if inspect.signature(obj).parameters:
            assert "Args:" in doc, f"tensorcut.{name}: no Args"
    elif name not in ("TensorcutError", "Plan"):  # classes built from their fields
        assert "Args:" in doc, f"tensorcut.{name}: no Args"


def test_compress_is_the_function_and_the_package_is_importable() -> None:
    import tensorcut.compression as pkg

    assert inspect.isfunction(tc.compress) and tc.compress is pkg.compress
    assert tc.plan is pkg.plan and tc.CompressConfig is pkg.CompressConfig


def test_error_has_a_fix_it_message() -> None:
    with pytest.raises(
        tc.TensorcutError, match=r"unknown method 'svd3'; choose one of: auto, cp, tr"
    ):
        tc.CompressConfig(method="svd3", ratio=0.5)


def test_compress_then_decompress_round_trip() -> None:
    torch = pytest.importorskip("torch")
    model = tc.create_model("resnet20", num_classes=10, width=0.25).eval()
    x = torch.randn(2, 3, 16, 16)
    model, p = tc.compress(model, tc.CompressConfig(rank="full"), calibration=x, progress=False)
    assert p.totals()["factorized_layers"] > 0
    with torch.no_grad():
        y = model(x)
    tc.decompress(model)
    assert not any(isinstance(m, tc.layers.FactorizedConv2d) for m in model.modules())
    with torch.no_grad():
        z = model(x)
    # float32: the dense and factorized forms sum the same products in another order
    assert torch.allclose(y, z, rtol=1e-4, atol=1e-4 * float(y.abs().max()))


def test_importing_the_api_loads_no_cli() -> None:
    code = (
        "import sys, tensorcut, tensorcut.compression, tensorcut.train, tensorcut.study;"
        "print(sorted(m for m in sys.modules if m.startswith('tensorcut') and 'cli' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
