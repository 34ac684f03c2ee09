"""The ``run`` and ``report`` verbs' parser layer (``tensorcut/cli/run.py``): flags, defaults,
one-line
usage errors with status 2, and the mapping of flags onto RunConfig (the pipeline is stubbed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from tensorcut.cli import build_parser, main, verb_parsers
from tensorcut.cli.run import run_config
from tensorcut.layers import list_methods
from tensorcut.pipeline.run import RunConfig, print_summary


def _parse(*argv: str) -> Any:
    return build_parser().parse_args(["run", *argv])


def test_defaults() -> None:
    a = _parse("ck", "--target-ratio", "5", "--out", "o")
    assert (a.checkpoint, a.target_ratio, a.target_macs, a.max_drop) == ("ck", 5.0, None, None)
    assert (a.epochs, a.width, a.json) == (10, 1.0, False)
    assert a.model is None and a.dataset is None and a.data_dir is None
    assert run_config(a) == RunConfig(target_ratio=5.0)  # the rest: RunConfig's defaults
    cfg = run_config(a)
    assert (cfg.method, cfg.calib_subset, cfg.finetune_epochs, cfg.finetune_lr) == (
        "tucker2", 512, 10, 1e-4,
    )  # fmt: skip
    assert (cfg.probe_epochs, cfg.probe_images, cfg.train_subset) == (1, 2048, None)
    assert cfg.bn_recalibrate and not cfg.distill


def test_every_run_config_field_has_a_flag() -> None:
    argv = ["ck", "--out", "o", "--target-macs", "0.5", "--method", "cp", "--calib-subset", "64"]
    argv += ["--bipartitions", "out", "in-kw", "--curve-ratios", "2", "4", "--finetune-epochs", "3"]
    argv += ["--finetune-lr", "0.01", "--finetune-patience", "2", "--distill"]
    argv += ["--no-bn-recalibrate", "--probe-epochs", "0", "--probe-images", "16"]
    argv += ["--batch-size", "32", "--seed", "5", "--subset", "100", "--measured"]
    argv += ["--match-epochs", "0", "--match-lr", "0.01"]  # > 0 epochs need BN re-estimation
    cfg = run_config(_parse(*argv))
    assert dataclasses.asdict(cfg) == {
        "target_ratio": None, "target_macs": 0.5, "max_drop": None, "method": "cp",
        "calib_subset": 64, "bipartitions": ("OUT", "OUT-KH"), "curve_ratios": (2.0, 4.0),
        "finetune_epochs": 3, "finetune_lr": 0.01, "finetune_patience": 2, "distill": True,
        "bn_recalibrate": False, "probe_epochs": 0, "probe_images": 16, "batch_size": 32,
        "seed": 5, "train_subset": 100, "measured": True, "match_epochs": 0, "match_lr": 0.01,
    }  # fmt: skip
    goals = {"target_ratio", "target_macs", "max_drop"}  # one at a time; checked in test_defaults
    changed = {f.name for f in dataclasses.fields(RunConfig) if getattr(cfg, f.name) != f.default}
    # --match-epochs > 0 needs BatchNorm re-estimation (turned off above): on its own
    assert run_config(_parse("ck", "--out", "o", "--target-ratio", "2", "--match-epochs", "2")) == (
        RunConfig(target_ratio=2.0, match_epochs=2)
    )
    changed.add("match_epochs")
    assert changed | goals == {f.name for f in dataclasses.fields(RunConfig)}
    assert _parse("--out", "o", "--max-drop", "0.02").max_drop == 0.02


def test_method_choices_are_the_registry_plus_auto() -> None:
    run = verb_parsers(build_parser())["run"]
    action = next(x for x in run._actions if "--method" in x.option_strings)
    assert list(action.choices) == [*list_methods(), "auto"]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (
            ["--out", "o"],
            "one of the arguments --target-ratio --target-macs --max-drop is required",
        ),
        (
            ["--out", "o", "--target-ratio", "5", "--max-drop", "0.1"],
            "argument --max-drop: not allowed with argument --target-ratio",
        ),
        (["--target-ratio", "5"], "the following arguments are required: --out"),
        (
            ["--out", "o", "--target-ratio", "x"],
            "argument --target-ratio: invalid float value: 'x'",
        ),
        (
            ["--out", "o", "--target-ratio", "5", "--bipartitions", "OUT-XY"],
            "argument --bipartitions: unknown bipartition 'OUT-XY'; valid: OUT, IN, KH, KW,",
        ),
        (
            ["--out", "o", "--target-ratio", "5", "--finetune-patience", "two"],
            "argument --finetune-patience: invalid int value: 'two'",
        ),
    ],
)
def test_usage_errors_end_in_one_error_line_and_status_2(argv, msg, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"tensorcut run: error: {msg}")


SUMMARY = {
    "rows": {
        "dense": {
            "params": 1000, "size_mb": 0.004, "macs": 50000, "latency_ms_b32": 1.5, "top1": 0.9,
            "top5": 1.0,
        },
        "compressed": {
            "params": 200, "size_mb": 0.001, "macs": 10000, "latency_ms_b32": 0.75, "top1": 0.5,
            "top5": 0.9,
        },
    },
    "goal": "5x conv parameters",
    "goal_met": True,
    "achieved": "5.1x",
    "report": "o/report.html",
}  # fmt: skip


def test_run_maps_flags_onto_the_pipeline(monkeypatch, tmp_path: Path, capsys) -> None:
    import tensorcut.pipeline.run

    seen: dict[str, Any] = {}

    def fake_run(out: Any, cfg: Any, **kw: Any) -> dict[str, Any]:
        seen.update(out=out, cfg=cfg, **kw)
        return SUMMARY

    monkeypatch.setattr(tensorcut.pipeline.run, "run", fake_run)
    argv = ["run", "--model", "vanilla-cnn", "--dataset", "digits", "--target-macs", "0.25"]
    argv += ["--method", "cp", "--no-bn-recalibrate", "--distill", "--subset", "64"]
    argv += ["--finetune-epochs", "2", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert (cfg.target_macs, cfg.method, cfg.bn_recalibrate, cfg.distill) == (
        0.25,
        "cp",
        False,
        True,
    )
    assert (cfg.train_subset, cfg.finetune_epochs, cfg.target_ratio) == (64, 2, None)
    assert (seen["model"], seen["dataset"], seen["checkpoint"]) == ("vanilla-cnn", "digits", None)
    assert seen["out"] == str(tmp_path / "o") and seen["command"][0] == "tensorcut"
    out = capsys.readouterr().out
    assert "compressed (no FT)" in out and out.rstrip().endswith("report: o/report.html")
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == SUMMARY


def test_a_bad_goal_from_the_pipeline_is_one_line(tmp_path: Path, capsys) -> None:
    rc = main(["run", "--target-ratio", "0.5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        "tensorcut run: error: --target-ratio must be > 1 (dense / compressed parameters), got 0.5"
    ]
    assert not (tmp_path / "o").exists()


def test_print_summary(capsys) -> None:
    print_summary(SUMMARY)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "params",
        "size",
        "MB",
        "MACs",
        "CPU",
        "ms",
        "b=32",
        "top-1",
        "top-5",
    ]
    assert lines[1].split() == ["dense", "1,000", "0.004", "50,000", "1.50", "0.9000", "1.0000"]
    assert lines[2].startswith("compressed (no FT)")
    assert lines[3] == "goal: 5x conv parameters — met (5.1x)"
    print_summary(dict(SUMMARY, goal_met=False))
    assert "— NOT met (5.1x)" in capsys.readouterr().out


def test_report_verb(monkeypatch, tmp_path: Path, capsys) -> None:
    import tensorcut.pipeline.report

    monkeypatch.setattr(
        tensorcut.pipeline.report, "write_report", lambda d: Path(d) / "report.html"
    )
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"report: {tmp_path / 'report.html'}\n"
    assert main(["report", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"report": str(tmp_path / "report.html")}
