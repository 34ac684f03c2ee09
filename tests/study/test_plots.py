"""Figures of a study (``analysis/plots.py``): only the figures the results support, one folder
per model when a file holds several, valid PNG/SVG files, one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from analysis_helpers import batches, tiny_cnn

from tensorcut.errors import TensorcutError
from tensorcut.study.plots import FORMATS, plot
from tensorcut.study.store import ResultsStore
from tensorcut.study.sweep import analyze

STUDY = {"layers": ["conv2"], "bipartitions": ["OUT"], "keep": ["1,3"], "csv": False}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One results file holding a single-layer SVD sweep of two different models."""
    db = tmp_path_factory.mktemp("plots") / "r.sqlite"
    fps = [
        analyze(tiny_cnn(seed=s), batches(), db, progress=False, **STUDY).fingerprint
        for s in (0, 1)
    ]
    return db, fps


def test_only_the_supported_figures_in_one_folder_per_model(two_models, tmp_path: Path) -> None:
    db, fps = two_models
    files = plot(db, tmp_path / "fig", formats=("svg",))
    assert {p.parent.name for p in files} == set(fps) and len(set(fps)) == 2
    names = {p.name for p in files if p.parent.name == fps[0]}
    assert {"spectra.svg", "accuracy_vs_norm_loss_OUT_val.svg"} <= names
    # no CP, all-layer or recovery rows: none of their figures
    assert not any(n.startswith(("cp_", "all_layers", "recovery")) for n in names)
    assert all("<svg" in p.read_text(encoding="utf-8")[:500] for p in files)


def test_one_model_selected_by_fingerprint(two_models, tmp_path: Path) -> None:
    db, fps = two_models
    files = plot(db, tmp_path / "one", formats=("png",), fingerprint=fps[1])
    assert files and all(p.parent == tmp_path / "one" and p.suffix == ".png" for p in files)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in files)
    with pytest.raises(TensorcutError) as e:
        plot(db, tmp_path / "x", fingerprint="nope")
    assert str(e.value) == f"fingerprint 'nope' not in {db}; present: {', '.join(sorted(fps))}"


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(TensorcutError) as e:
        plot(tmp_path / "r.sqlite", tmp_path / "fig", formats=("png", "jpg"))
    assert str(e.value) == "unknown figure format(s) ['jpg']; use png, svg or pdf"
    with ResultsStore(tmp_path / "empty.sqlite"):
        pass
    with pytest.raises(TensorcutError) as e:
        plot(tmp_path / "empty.sqlite", tmp_path / "fig")
    assert str(e.value) == (
        f"{tmp_path / 'empty.sqlite'} holds no results yet; run `tensorcut analyze` first"
    )
    assert FORMATS == ("png", "svg")
