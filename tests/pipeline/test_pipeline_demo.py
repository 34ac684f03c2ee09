"""``make demo`` (``demo.py``): the run it configures (full and ``--fast``) and what it prints.
The pipeline is stubbed here; tests/test_cli.py runs the real fast demo end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import tensorcut.pipeline.run
from tensorcut.pipeline.demo import DEMO_MODEL, DEMO_WIDTH, run_demo

SUMMARY = {
    "rows": {
        "dense": {
            "params": 1000, "size_mb": 0.004, "macs": 50000, "latency_ms_b32": 1.5, "top1": 0.9,
            "top5": 1.0,
        },
    },
    "goal": "5x conv parameters",
    "goal_met": True,
    "achieved": "5.2x",
    "report": "r/report.html",
}  # fmt: skip


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def fake_run(out: Any, cfg: Any, **kw: Any) -> dict[str, Any]:
        seen.append(dict(out=out, cfg=cfg, **kw))
        return SUMMARY

    monkeypatch.setattr(tensorcut.pipeline.run, "run", fake_run)
    return seen


@pytest.mark.parametrize("fast", [False, True])
def test_the_run_it_configures(fast: bool, calls, tmp_path: Path, capsys) -> None:
    assert run_demo(tmp_path / "d", fast=fast) == 0
    (c,) = calls
    cfg = c["cfg"]
    assert (c["model"], c["dataset"], c["width"]) == (DEMO_MODEL, "digits", DEMO_WIDTH)
    assert (cfg.target_ratio, cfg.method) == (5.0, "tucker2")
    assert c["out"] == tmp_path / "d"
    assert c["command"] == ["tensorcut", "demo", "--out", str(tmp_path / "d")] + (
        ["--fast"] if fast else []
    )
    if fast:
        assert (c["train_epochs"], cfg.finetune_epochs, cfg.calib_subset) == (1, 1, 64)
        assert cfg.curve_ratios == (5.0,) and cfg.bipartitions == ("OUT",)
    else:
        assert (c["train_epochs"], cfg.finetune_epochs, cfg.calib_subset) == (15, 8, 144)
        assert 5.0 in cfg.curve_ratios and len(cfg.bipartitions) == 5
    out = capsys.readouterr().out
    assert "goal: 5x conv parameters — met (5.2x)" in out
    assert f"outputs in {tmp_path / 'd'}: dense/, compressed/, finetuned/" in out


def test_json_is_the_summary_with_its_directory(calls, tmp_path: Path, capsys) -> None:
    assert run_demo(tmp_path / "d", fast=True, as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == dict(SUMMARY, out=str(tmp_path / "d"))
