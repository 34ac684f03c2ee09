"""Sweeps: rows, resume, all-layer averages, CP, recovery, figures, bad input."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from analysis_helpers import batches, tiny_cnn

from tensorcut.errors import TensorcutError
from tensorcut.study import cache, sweep
from tensorcut.study.store import ResultsStore
from tensorcut.tenalg import n_singular


def _count_evals(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"n": 0}
    orig_fast, orig_full = cache.LayerRunner.evaluate, cache.evaluate_full

    def fast(self: Any) -> Any:
        calls["n"] += 1
        return orig_fast(self)

    def full(model: Any, data: Any) -> Any:
        calls["n"] += 1
        return orig_full(model, data)

    monkeypatch.setattr(cache.LayerRunner, "evaluate", fast)
    monkeypatch.setattr(sweep, "evaluate_full", full, raising=False)
    monkeypatch.setattr(cache, "evaluate_full", full)
    return calls


def test_single_layer_rows_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "r.sqlite"
    calls = _count_evals(monkeypatch)
    kw = dict(layers=["conv2", "conv3"], bipartitions=["OUT", "KW", "OUT-IN"], progress=False)
    rep = sweep.analyze(model, batches(), out, **kw)
    expect = 1 + sum(
        len(range(1, n_singular(model.get_submodule(layer).weight.shape, b)))
        for layer in ("conv2", "conv3")
        for b in ("OUT", "KW", "OUT-IN")
    )
    assert rep.evaluated == expect == calls["n"]
    assert rep.fast_path == {"conv2": "", "conv3": ""}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with ResultsStore(out) as st:
        assert st.count() == expect
        rows = st.rows(kind="single")
        assert all(r["fast_path"] == 1 for r in rows)
        r = st.rows(layer="conv3", bipartition="OUT", keep="4")[0]
        assert r["keep_int"] == 4 and r["n_values"] == 8 and 0 < r["norm_loss_pct"] < 100
        assert r["compression_ratio"] == pytest.approx(8 * 8 * 9 / (4 * (8 + 72)))
        assert len(st.spectra()) == 2 * 7
    assert (tmp_path / "r.csv").exists() and (tmp_path / "r-spectra.csv").exists()

    # re-run: nothing evaluated
    calls["n"] = 0
    rep2 = sweep.analyze(model, batches(), out, **kw)
    assert rep2.evaluated == 0 == calls["n"] and rep2.skipped == expect
    # interrupted sweep: drop three rows, re-run evaluates exactly those
    con = sqlite3.connect(out)
    con.execute(
        "DELETE FROM results WHERE id IN (SELECT id FROM results WHERE kind='single' ORDER BY id "
        "DESC LIMIT 3)"
    )
    con.commit()
    con.close()
    rep3 = sweep.analyze(model, batches(), out, **kw)
    assert rep3.evaluated == 3 == calls["n"]
    with ResultsStore(out) as st:
        assert st.count() == expect


def test_cached_sweep_matches_uncached_sweep(tmp_path: Path) -> None:
    model = tiny_cnn()
    kw = dict(layers=["conv2"], bipartitions=["OUT", "OUT-KW"], progress=False, csv=False)
    sweep.analyze(model, batches(), tmp_path / "a.sqlite", **kw)
    sweep.analyze(model, batches(), tmp_path / "b.sqlite", use_cache=False, **kw)
    cols = ("layer", "bipartition", "keep", "loss", "top1", "top5", "norm_loss_pct")
    with ResultsStore(tmp_path / "a.sqlite") as a, ResultsStore(tmp_path / "b.sqlite") as b:
        ra = [tuple(r[c] for c in cols) for r in a.rows()]
        rb = [tuple(r[c] for c in cols) for r in b.rows()]
        assert [r["fast_path"] for r in a.rows(kind="single")] == [1] * len(ra[1:])
        assert [r["fast_path"] for r in b.rows(kind="single")] == [0] * len(rb[1:])
    assert ra == rb


def test_all_layers_reports_average_norm_loss(tmp_path: Path) -> None:
    model = tiny_cnn()
    rep = sweep.analyze(
        model,
        {"train": batches(seed=1), "val": batches()},
        tmp_path / "r.sqlite",
        bipartitions=["OUT"],
        single_layer=False,
        all_layers=True,
        all_layer_fractions=[0.5, 0.25],
        progress=False,
    )
    assert rep.evaluated == 2 * (1 + 2)
    with ResultsStore(tmp_path / "r.sqlite") as st:
        rows = st.rows(kind="all-layers", split="val")
    assert len(rows) == 2
    for r in rows:
        per = r["extra"]["per_layer"]
        assert set(per) == {"conv1", "conv2", "conv3"}
        assert r["norm_loss_pct"] == pytest.approx(
            sum(m["norm_loss_pct"] for m in per.values()) / 3
        )
        assert r["layer"] == "conv1,conv2,conv3"


def test_cp_sweep_and_recovery_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("tensorcut.decompose.cp")
    model = tiny_cnn()
    train = batches(n=64, seed=3)
    out = tmp_path / "r.sqlite"
    rep = sweep.analyze(
        model,
        batches(),
        out,
        layers=["conv2", "conv3"],
        bipartitions=["OUT", "OUT-IN"],
        keep=["1,4"],
        cp_ranks=[1, 3],
        all_layers=True,
        recover_epochs=1,
        train_loader=train,
        recover_kwargs={"cp_ranks": (2, 1), "fractions": (0.2, 0.0)},
        progress=False,
    )
    with ResultsStore(out) as st:
        cp = st.rows(kind="cp")
        assert len(cp) == 4 and all(r["compression_ratio"] > 0 for r in cp)
        assert {r["keep_int"] for r in cp} == {1, 3}
        rec = st.rows(kind="recovery")
        assert sorted({(r["method"], r["bipartition"]) for r in rec}) == [
            ("cp", ""),
            ("svd", "OUT"),
            ("svd", "OUT-IN"),
        ]
        assert sorted({r["epoch"] for r in rec}) == [0, 1]
    from tensorcut.study.plots import plot

    files = {p.name for p in plot(out, tmp_path / "fig", formats=("png", "svg"))}
    for stem in (
        "spectra",
        "accuracy_vs_norm_loss_OUT_val",
        "accuracy_vs_norm_loss_all_val",
        "robustness_vs_depth_val",
        "all_layers_val",
        "cp_truncation_val",
        "recovery_val",
        "correlation_vs_norm_loss_val",
    ):
        assert f"{stem}.png" in files and f"{stem}.svg" in files
    assert rep.evaluated > 0


def test_bad_input_messages(tmp_path: Path) -> None:
    model = tiny_cnn()
    out = tmp_path / "r.sqlite"
    with pytest.raises(TensorcutError) as e:
        sweep.analyze(model, batches(), out, layers=["conv7"], progress=False)
    assert str(e.value) == "unknown layer(s) 'conv7'; valid conv layers: conv1, conv2, conv3"
    with pytest.raises(TensorcutError) as e:
        sweep.analyze(model, batches(), out, bipartitions=["OUT-XX"], progress=False)
    assert (
        str(e.value)
        == "unknown bipartition 'OUT-XX'; valid: OUT, IN, KH, KW, OUT-IN, OUT-KH, OUT-KW"
    )
    with pytest.raises(TensorcutError) as e:
        sweep.analyze(
            model, batches(), out, layers=["conv2"], bipartitions=["KH"], keep=[4], progress=False
        )
    assert (
        str(e.value)
        == "keep=4 out of range for layer 'conv2' along KH (kernel (8, 6, 3, 3)): valid 1..3"
    )
    assert not out.exists()  # nothing created on bad input
    out.write_text("not,a,database\n" * 50)
    with pytest.raises(TensorcutError) as e:
        sweep.analyze(model, batches(), out, layers=["conv2"], bipartitions=["KH"], progress=False)
    assert "is corrupt or not an SQLite database" in str(e.value)
    assert out.read_text() == "not,a,database\n" * 50
