"""The demo's truncation study (``analysis/demo.py``): a digits checkpoint swept on its own
validation split, resumable, with its figures. (tests/pipeline/test_pipeline_demo.py covers
``tensorcut/pipeline/demo.py``.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tensorcut import models
from tensorcut.checkpoint import io as tio
from tensorcut.study.demo import demo_sweep
from tensorcut.study.store import ResultsStore
from tensorcut.train.api import model_kwargs_for


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """An untrained width-0.125 vanilla-cnn saved for digits (the sweep needs no training)."""
    kwargs = model_kwargs_for("digits", 0.125)
    torch.manual_seed(0)
    meta = {
        "model": {"name": "vanilla-cnn", "kwargs": kwargs},
        "dataset": {"name": "digits", "val_fraction": 0.1, "seed": 0},
    }
    tio.save(models.create("vanilla-cnn", **kwargs), tmp_path / "ck", meta)
    return tmp_path / "ck"


def test_fast_demo_sweep_records_draws_and_resumes(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The figures are drawn by plots.plot (tested in test_plots.py); stubbed here to keep this
    test fast, it must get the results file, out/figures and PNG only (fast)."""
    import tensorcut.study.plots

    drawn: list[tuple[Any, ...]] = []

    def fake_plot(results: Any, out: Any, *, formats: Any) -> list[Path]:
        drawn.append((results, out, formats))
        return [Path(out) / "spectra.png"]

    monkeypatch.setattr(tensorcut.study.plots, "plot", fake_plot)
    out = tmp_path / "study"
    res = demo_sweep(checkpoint, out, fast=True, progress=False)
    assert res["results"] == out / "truncation.sqlite" and res["results"].is_file()
    assert drawn == [(out / "truncation.sqlite", out / "figures", ("png",))]
    assert res["figures"] == [out / "figures" / "spectra.png"]
    with ResultsStore(res["results"]) as st:
        rows = st.rows(kind="single")
        assert {r["bipartition"] for r in rows} == {"OUT", "KW", "OUT-IN"}
        assert {r["method"] for r in rows} == {"svd"}  # fast: no CP ranks
        assert {r["kind"] for r in st.rows()} == {"baseline", "single"}  # fast: no all-layer sweep
        base = st.rows(kind="baseline")
        n_rows = len(st.rows())
    assert base[0]["data"].startswith("digits:val:") and base[0]["n"] > 0  # its own split
    assert res["report"].evaluated == n_rows == len(rows) + 1
    again = demo_sweep(checkpoint, out, fast=True, progress=False)
    assert again["report"].evaluated == 0  # resumed: everything was recorded
