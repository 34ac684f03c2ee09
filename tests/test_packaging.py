"""Packaging: the sdist holds what the tests need, and the wheel built from it the licence and data.

Built with the environment's setuptools (no isolation, no network) from a copy of the source tree:
sdist first, then a wheel from the unpacked sdist, as pip does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(
    ".git",
    ".venv",
    "runs",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "demo-out",
    ".hypothesis",
    ".pytest_cache",
)


def _build(kind: str, src: Path, out: Path) -> Path:
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out / r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], zipfile.ZipFile]:
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(
            f"setuptools {setuptools.__version__} < 77 cannot read the SPDX licence fields (pip "
            "installs a newer one)"
        )
    tmp = tmp_path_factory.mktemp("pkg")
    shutil.copytree(ROOT, tmp / "src", ignore=SKIP)
    sdist = _build("sdist", tmp / "src", tmp)
    with tarfile.open(sdist) as t:
        names = [n.split("/", 1)[1] for n in t.getnames() if "/" in n]
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            t.extractall(tmp / "unpacked", filter="data")
        else:  # pragma: no cover - our own archive, just built
            t.extractall(tmp / "unpacked")
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = _build("wheel", unpacked, tmp / "wheel")
    return names, zipfile.ZipFile(wheel)


def test_sdist_holds_the_whole_test_suite_docs_and_licence(
    built: tuple[list[str], zipfile.ZipFile],
) -> None:
    names = set(built[0])
    tracked_tests = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert tracked_tests <= names, sorted(tracked_tests - names)[
        :10
    ]  # conftest.py and every subfolder
    assert {
        "tests/conftest.py",
        "tests/train/test_tdlrt_ddp.py",
        "LICENSE",
        "README.md",
        "docs/tdlrt.md",
        "examples/train_low_rank.py",
        "benchmarks/bench_memory.py",
        "tensorcut/py.typed",
        "tensorcut/_data/digits.npz",
        "tensorcut/_data/README.md",
    } <= names


def test_wheel_carries_licence_types_and_data_and_declares_extras(
    built: tuple[list[str], zipfile.ZipFile],
) -> None:
    wheel = built[1]
    names = set(wheel.namelist())
    assert {
        "tensorcut/py.typed",
        "tensorcut/_data/digits.npz",
        "tensorcut/_data/README.md",
    } <= names
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = wheel.read(meta_name).decode()
    assert "License-Expression: MIT" in meta and "License-File: LICENSE" in meta
    assert "Classifier: Typing :: Typed" in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert not any(
        "scikit-learn" in r and "extra" not in r for r in requires
    )  # digits are embedded
    for pkg in ("onnx>=", "onnxruntime>=", "onnxscript>="):
        assert any(pkg in r and 'extra == "onnx"' in r for r in requires), pkg
    assert "Copyright (c) 2026 the tensorcut authors" in (ROOT / "LICENSE").read_text()
