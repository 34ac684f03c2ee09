"""The run report, from a synthetic run directory: verdict, warnings, links, figures, backend."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import matplotlib
import pytest

from tensorcut.errors import TensorcutError
from tensorcut.pipeline import report
from tensorcut.pipeline.report import report_warnings, verdict, write_report


def _row(params: int, macs: int, top1: float, b1: float, b32: float) -> dict[str, Any]:
    return {
        "params": params,
        "size_mb": params * 4e-6,
        "macs": macs,
        "top1": top1,
        "top5": 0.99,
        "loss": 0.5,
        "n": 360,
        "latency_ms_b1": b1,
        "latency_ms_b32": b32,
    }


def _layer(name: str, error: float | None, status: str = "factorize") -> dict[str, Any]:
    return {
        "name": name,
        "status": status,
        "method": "tucker2",
        "ranks": [4, 4],
        "params_before": 2304,
        "params_after": 800,
        "error": error,
        "sensitivity": 1.5,
        "reason": "" if status == "factorize" else "too small",
    }


SUMMARY: dict[str, Any] = {
    "goal": "conv-layer compression ratio >= 2",
    "goal_met": True,
    "achieved": "conv-layer ratio 2.88",
    "top1_drop": 0.0127,
    "plan_totals": {"conv_ratio": 2.88, "conv_mac_ratio": 2.5},
    "rows": {
        "dense": _row(20000, 400000, 0.9, 1.0, 8.0),
        "compressed": _row(10000, 200000, 0.5, 0.9, 6.0),
        "final": _row(10000, 200000, 0.8873, 0.9, 6.0),
    },
}
LAYERS = [
    _layer("features.3", 0.31),
    _layer("features.6", 0.42),
    _layer("features.0", None, status="dense"),
]


def make_run_dir(
    root: Path, summary: dict[str, Any] | None = None, layers: list[dict[str, Any]] | None = None
) -> Path:
    """The files write_report reads, as `tensorcut run` leaves them (see
    tensorcut/pipeline/run.py)."""
    rd = root / "run"
    for sub in ("dense", "compressed", "finetuned", "export"):
        (rd / sub).mkdir(parents=True, exist_ok=True)
    stages = {
        "dense": {"path": "dense"},
        "study": {"results": "study/truncation.sqlite"},
        "curve": {
            "baseline_top1": 0.91,
            "points": [
                {"kind": k, "ratio": r, "top1": 0.9 - 0.05 * r, "target": r}
                for k in ("guided", "error", "uniform")
                for r in (2, 4)
            ],
        },
        "compress": {
            "path": "compressed",
            "allocation": "guided",
            "calibration": {"guided": {"ratio": 2.88, "top1": 0.6, "loss": 1.0}},
        },
        "finetune": {
            "path": "finetuned",
            "history": [
                {"epoch": 1, "val_top1": 0.85, "val_loss": 0.6},
                {"epoch": 2, "val_top1": 0.88, "val_loss": 0.5},
            ],
        },
        "verify": {"path": "verify.json"},
        "export": {"onnx": "export/model.onnx", "checked": True, "check": "checked"},
    }
    (rd / "run.json").write_text(
        json.dumps(
            {
                "format": "tensorcut-run",
                "stages": stages,
                "command": ["tensorcut", "run"],
                "settings": {},
                "versions": {},
            }
        )
    )
    (rd / "verify.json").write_text(json.dumps(summary or SUMMARY))
    (rd / "finetuned" / "meta.json").write_text(
        json.dumps({"model": {"name": "vanilla-cnn"}, "dataset": {"name": "digits"}})
    )
    (rd / "compressed" / "plan.json").write_text(json.dumps({"layers": layers or LAYERS}))
    for f in ("export/model.onnx", "finetuned/model.safetensors", "compressed/model.safetensors"):
        (rd / f).write_bytes(b"x")
    return rd


def _html(tmp_path: Path, **kw: Any) -> str:
    return write_report(make_run_dir(tmp_path, **kw)).read_text()


def _with_latency(
    summary: dict[str, Any], dense: tuple[float, float], final: tuple[float, float]
) -> dict[str, Any]:
    """``summary`` with median/IQR latency records at batch 1 (median, IQR) for dense and final."""
    s = copy.deepcopy(summary)
    for key, (med, iqr) in (("dense", dense), ("compressed", final), ("final", final)):
        r = s["rows"][key]
        del r["latency_ms_b1"], r["latency_ms_b32"]
        r["latency"] = {
            "b1": {
                "median_ms": med,
                "iqr_ms": iqr,
                "threads": 2,
                "batch": 1,
                "device": "cpu (test)",
            }
        }
    return s


def test_verdict_from_the_numbers_without_a_speed_claim(tmp_path: Path) -> None:
    html = _html(tmp_path)
    v = verdict(SUMMARY)
    # 20000 / 10000 parameters; 100 * (0.8873 - 0.9) = -1.27 points
    assert v.startswith("2.00x smaller (parameters), -1.27 pt top-1")
    # only medians recorded: the spread is unknown, so no speed-up is claimed
    assert v.endswith(
        "speed at batch 1 and 32 not judged (timing spread not recorded; medians under Latency)."
    )
    assert "faster" not in v and "slower" not in v
    m = re.search(r"<p class='verdict'>([^<]*)</p>", html)
    assert (
        m
        and m.group(1).startswith("2.00x smaller")
        and html.index("verdict") < html.index("Before / after")
    )


@pytest.mark.parametrize(
    "dense,final,phrase",
    [
        ((1.0, 0.2), (0.9, 0.15), "no measurable difference in speed at batch 1"),
        ((1.5, 0.1), (1.0, 0.1), "1.50x faster at batch 1"),
        ((1.0, 0.1), (2.0, 0.1), "2.00x slower at batch 1"),
    ],
)
def test_speed_claimed_only_beyond_the_measured_spread(
    dense: tuple[float, float], final: tuple[float, float], phrase: str
) -> None:
    v = verdict(_with_latency(SUMMARY, dense, final))
    assert v.endswith(f", {phrase} on cpu (test).")


def test_healthy_run_has_no_warning_banner(tmp_path: Path) -> None:
    assert report_warnings(_with_latency(SUMMARY, (1.0, 0.2), (0.9, 0.15)), LAYERS) == []
    assert "class='warnings'" not in _html(
        tmp_path, summary=_with_latency(SUMMARY, (1.0, 0.2), (0.9, 0.15))
    )


def test_banner_when_more_macs_than_dense(tmp_path: Path) -> None:
    s = copy.deepcopy(SUMMARY)
    s["rows"]["final"]["macs"] = 500000  # FCR 400000 / 500000 = 0.8
    s["plan_totals"]["conv_mac_ratio"] = 0.68
    html = _html(tmp_path, summary=s)
    assert "class='warnings'" in html and "FCR 0.80 &lt; 1" in html
    assert html.index("class='warnings'") < html.index("Before / after")


def test_banner_when_conv_layers_need_more_macs(tmp_path: Path) -> None:
    s = copy.deepcopy(SUMMARY)
    s["plan_totals"]["conv_mac_ratio"] = 0.68
    assert any("Conv-layer FCR 0.68 < 1" in w for w in report_warnings(s, LAYERS))


def test_banner_when_measurably_slower(tmp_path: Path) -> None:
    html = _html(tmp_path, summary=_with_latency(SUMMARY, (1.0, 0.1), (2.0, 0.1)))
    assert (
        "class='warnings'" in html
        and "The compressed model is slower: 2.00x slower at batch 1" in html
    )


def test_higher_median_without_spread_is_flagged_as_possible_noise() -> None:
    s = copy.deepcopy(SUMMARY)
    s["rows"]["final"]["latency_ms_b32"] = 9.0
    w = report_warnings(s, LAYERS)
    assert len(w) == 1 and "batch 32 is higher than dense" in w[0] and "may be noise" in w[0]


def test_banner_when_a_layer_is_lost(tmp_path: Path) -> None:
    html = _html(tmp_path, layers=[*LAYERS, _layer("features.9", 0.998)])
    assert (
        "class='warnings'" in html and "features.9 (0.998)" in html and "features.3 (" not in html
    )


def test_links_to_exported_files_are_relative_and_exist(tmp_path: Path) -> None:
    rd = make_run_dir(tmp_path)
    html = write_report(rd).read_text()
    links = re.findall(r'<a href="([^"]+)"', html)
    assert (
        "export/model.onnx" in links
        and "finetuned/model.safetensors" in links
        and "verify.json" in links
    )
    assert all((rd / link).is_file() for link in links)
    assert "dense/model.safetensors" not in links  # not written in this run dir: not linked


def test_latency_section_states_what_was_recorded(tmp_path: Path) -> None:
    html = _html(tmp_path)
    table = re.search(r'<table class="latency">.*?</table>', html)
    assert (
        table and table.group(0).count("not recorded") == 4 * 2 * 3
    )  # IQR, threads, device, reps; 2 batches; 3 models
    html = write_report(
        make_run_dir(tmp_path / "b", summary=_with_latency(SUMMARY, (1.0, 0.2), (0.9, 0.15)))
    ).read_text()
    table = re.search(r'<table class="latency">.*?</table>', html)
    assert (
        table
        and "cpu (test)" in table.group(0)
        and "0.200" in table.group(0)
        and table.group(0).count("not recorded") == 3  # reps: medians and IQRs only, 3 models
    )


def test_figures_full_width_and_click_to_enlarge_offline(tmp_path: Path) -> None:
    html = _html(tmp_path)
    imgs = re.findall(r'<img class="zoom" [^>]*src="data:image/png;base64,', html)
    assert len(imgs) == 3
    assert "img.zoom{width:100%" in html and "max-width:520px" not in html
    assert "lightbox" in html and "http://" not in html and "https://" not in html


def test_finetune_figure_keeps_the_test_point_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    figs: list[Any] = []
    monkeypatch.setattr(report, "_png", lambda fig: figs.append(fig) or "")
    hist = [
        {"epoch": 1, "val_top1": 0.85, "val_loss": 0.6},
        {"epoch": 2, "val_top1": 0.88, "val_loss": 0.5},
    ]
    report._finetune_figure(hist, 0.5)
    lines = {l.get_label(): l for ax in figs[0].axes for l in ax.get_lines()}
    val = lines["validation top-1"]
    assert list(val.get_xdata()) == [1, 2] and list(val.get_ydata()) == [0.85, 0.88]
    test = [l for name, l in lines.items() if name.startswith("test top-1")]
    assert len(test) == 1 and list(test[0].get_xdata()) == [0] and test[0].get_linestyle() == "None"


def test_caller_backend_is_unchanged(tmp_path: Path) -> None:
    before = matplotlib.get_backend()
    try:
        matplotlib.use("pdf")
        write_report(make_run_dir(tmp_path))
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)


@pytest.mark.parametrize(
    "rel,content,msg",
    [
        ("run.json", b"[1, 2]", "is not a tensorcut run ledger"),
        ("verify.json", None, "verify.json is missing"),
        ("compressed/plan.json", b"\xff\xfe{", "plan.json is unreadable"),
        ("finetuned/meta.json", b"[]", "holds a JSON list"),
        ("finetuned/meta.json", b'{"model": {}}', "finetuned/meta.json lacks model.name"),
        (
            "finetuned/meta.json",
            b'{"model": {"name": "vanilla-cnn"}, "dataset": {"seed": "0"}}',
            "finetuned/meta.json: dataset.seed must be a non-negative integer, not '0'",
        ),
    ],
)
def test_broken_run_dir_is_one_line(
    tmp_path: Path, rel: str, content: bytes | None, msg: str
) -> None:
    rd = make_run_dir(tmp_path)
    if content is None:
        (rd / rel).unlink()
    else:
        (rd / rel).write_bytes(content)
    with pytest.raises(TensorcutError, match=re.escape(msg)):
        write_report(rd)
    assert not (rd / "report.html").exists()


def _with_stats(
    summary: dict[str, Any], dense_ms: list[float], final_ms: list[float], session: int
) -> dict[str, Any]:
    """``summary`` with :meth:`LatencyStats.to_dict` records at batch 32 (raw times kept)."""
    from tensorcut.timing import latency_stats

    s = copy.deepcopy(summary)
    for key, times in (("dense", dense_ms), ("compressed", final_ms), ("final", final_ms)):
        r = s["rows"][key]
        del r["latency_ms_b1"], r["latency_ms_b32"]
        r["latency"] = {
            "b32": latency_stats(
                key, times, batch=32, threads=2, device="cpu", warmup=3, session=session
            ).to_dict()
        }
    return s


def test_timing_records_are_compared_by_the_timing_module(tmp_path: Path) -> None:
    # paired rounds (one session): every round the compressed model takes half the time
    dense = [10.0, 14.0, 11.0, 13.0, 12.0]
    s = _with_stats(SUMMARY, dense, [t / 2 for t in dense], session=7)
    assert verdict(s).endswith(", 2.00x faster at batch 32 on cpu.")
    # paired ratios straddling 1 (0.8 .. 1.25): no measurable difference
    s = _with_stats(SUMMARY, dense, [8.0, 17.5, 11.0, 10.4, 15.0], session=7)
    assert "no measurable difference in speed at batch 32" in verdict(s)
    html = write_report(make_run_dir(tmp_path, summary=s)).read_text()
    table = re.search(r'<table class="latency">.*?</table>', html)
    assert (
        table
        and "<td>32</td>" in table.group(0)
        and "<td>2</td>" in table.group(0)
        and "<td>5 (3)</td>" in table.group(0)  # reps (warm-up)
        and "not recorded" not in table.group(0)
    )
    assert "no measurable difference" in html and "median and interquartile range" in html
