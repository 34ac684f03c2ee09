"""`tensorcut run`: the pipeline at tiny scale, resumability, refusals, the report in Chromium."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tensorcut.checkpoint import io as tio
from tensorcut.errors import TensorcutError
from tensorcut.pipeline.run import STAGES, RunConfig, run

TINY = dict(
    calib_subset=64,
    finetune_epochs=1,
    finetune_lr=1e-3,
    curve_ratios=(2.0, 4.0),
    bipartitions=("OUT",),
    probe_images=64,
    train_subset=96,
)


@pytest.fixture(scope="module")
def run_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    summary = run(
        out, RunConfig(target_ratio=3.0, **TINY), checkpoint=tiny_checkpoint, progress=False
    )
    return out, summary


def test_run_meets_ratio_goal_and_writes_every_stage(run_dir):
    out, s = run_dir
    assert s["goal_met"] and s["plan_totals"]["conv_ratio"] >= 3.0
    for p in (
        "dense/model.safetensors",
        "compressed/plan.json",
        "finetuned/meta.json",
        "verify.json",
        "export/model.onnx",
        "report.html",
        "study/truncation.sqlite",
    ):
        assert (out / p).exists(), p
    rows = s["rows"]
    assert rows["final"]["params"] < rows["dense"]["params"]
    assert rows["final"]["params"] == sum(
        p.numel() for p in tio.load(out / "finetuned").parameters()
    )
    state = json.loads((out / "run.json").read_text())
    assert list(state["stages"]) == list(STAGES)
    assert (
        tio.load_checkpoint(out / "finetuned").meta["finetune"]["train_images"] == 96
    )  # RunConfig.train_subset
    assert (
        state["stages"]["export"]["checked"]
        and "batch 1 and 7" in state["stages"]["export"]["check"]
    )
    # BatchNorm statistics were re-estimated on the calibration subset after compressing
    bn = tio.load_checkpoint(out / "compressed").meta["bn_recalibration"]
    assert bn["batchnorm_layers"] > 0 and bn["images"] == TINY["calib_subset"]
    calib = state["stages"]["compress"]["calibration"]
    assert {"guided", "error", "uniform"} <= set(calib) and all("loss" in v for v in calib.values())
    # each allocation was probed (a short fine-tune) and the best probed one was applied
    assert all(0 <= v["probe"]["top1"] <= 1 for v in calib.values())
    chosen = state["stages"]["compress"]["allocation"]
    assert calib[chosen]["probe"]["top1"] == max(v["probe"]["top1"] for v in calib.values())
    # the measured allocation is opt-in (RunConfig.measured): not measured, not compared; the run
    # says why it chose what it chose
    assert "measured" not in calib and not (out / "study" / "drops.json").exists()
    assert "layer_matching" not in state["stages"]["compress"]  # match_epochs=0: off
    assert state["stages"]["compress"]["why"].startswith("the highest calibration top-1 after")


def test_rerun_skips_finished_stages(run_dir, tiny_checkpoint, capsys):
    out, _ = run_dir
    before = (out / "finetuned" / "model.safetensors").stat().st_mtime_ns
    run(out, RunConfig(target_ratio=3.0, **TINY), checkpoint=tiny_checkpoint, progress=True)
    text = capsys.readouterr().out
    assert "[finetune] done (skipped)" in text and "[study] done (skipped)" in text
    assert "measuring each layer" not in text  # the drops of the first run are reused
    assert (out / "finetuned" / "model.safetensors").stat().st_mtime_ns == before


def test_interrupted_run_resumes_from_last_finished_stage(
    run_dir, tiny_checkpoint, tmp_path, capsys
):
    src, _ = run_dir
    out = tmp_path / "r"
    shutil.copytree(src, out)
    state = json.loads((out / "run.json").read_text())
    for s in ("finetune", "verify", "export", "report"):
        del state["stages"][s]
    (out / "run.json").write_text(json.dumps(state))
    shutil.rmtree(out / "finetuned")
    run(out, RunConfig(target_ratio=3.0, **TINY), checkpoint=tiny_checkpoint, progress=True)
    text = capsys.readouterr().out
    assert "[compress] done (skipped)" in text and "[finetune] up to" in text
    assert (out / "finetuned" / "model.safetensors").exists()


def test_run_dir_of_another_model_is_refused(run_dir, tmp_path):
    out, _ = run_dir
    other = tmp_path / "other"
    shutil.copytree(out / "dense", other)
    w = other / "model.safetensors"
    model = tio.load(other)
    with __import__("torch").no_grad():
        next(model.parameters()).add_(1.0)
    tio.save(model, other, json.loads((other / "meta.json").read_text()))
    with pytest.raises(TensorcutError, match="holds a run of another model"):
        run(out, RunConfig(target_ratio=3.0, **TINY), checkpoint=other, progress=False)
    assert w.exists()


def test_different_settings_are_refused(run_dir, tiny_checkpoint):
    out, _ = run_dir
    with pytest.raises(TensorcutError, match="was made with different settings"):
        run(out, RunConfig(target_ratio=4.0, **TINY), checkpoint=tiny_checkpoint, progress=False)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({}, "give exactly one goal"),
        ({"target_ratio": 2, "max_drop": 0.1}, "give exactly one goal"),
        ({"target_ratio": 0.5}, "--target-ratio must be > 1"),
        ({"target_macs": 2.0}, "--target-macs is the fraction"),
        (
            {"target_ratio": 2, "probe_epochs": -1},
            "--probe-epochs must be >= 0 and --probe-images >= 1; got -1 and 2048",
        ),
    ],
)
def test_bad_goals(kw, msg):
    with pytest.raises(TensorcutError, match=msg):
        RunConfig(**kw)


def test_unmet_goal_says_how_close(tiny_checkpoint, tmp_path):
    s = run(
        tmp_path / "r",
        RunConfig(max_drop=0.0, **dict(TINY, curve_ratios=(2.0,))),
        checkpoint=tiny_checkpoint,
        progress=False,
    )
    assert "top-1 drop" in s["achieved"]
    assert s["goal_met"] == (s["top1_drop"] <= 0.0)


def test_report_tables_and_embedded_figures(run_dir):
    out, _ = run_dir
    html = (out / "report.html").read_text()
    for cls in ("before-after", "per-layer", "provenance"):
        assert f'class="{cls}"' in html
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,', html)
    assert len(imgs) >= 3
    assert "http://" not in html and "https://" not in html  # opens offline


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian package 'chromium'; .ci/run installs it)",
)
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    out, _ = run_dir
    r = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            (out / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = r.stdout
    total = re.search(r'data-figures="(\d+)"', dom)
    loaded = re.search(r'data-figures-loaded="(\d+)"', dom)
    assert total and loaded, r.stderr[-2000:]
    assert int(total.group(1)) >= 3 and loaded.group(1) == total.group(1)
    assert dom.count("<table") >= 3


# ---------------------------------------------------------------- a run directory edited or damaged


def _stage_damage(out: Path, what: str) -> None:
    if what == "verify.json missing":
        (out / "verify.json").unlink()
    elif what == "verify.json corrupt":
        (out / "verify.json").write_text("{not json")
    elif what == "export/model.onnx missing":
        (out / "export" / "model.onnx").unlink()
    elif what == "finetuned/meta.json corrupt":
        (out / "finetuned" / "meta.json").write_text("[1, 2")
    elif what == "finetuned/meta.json missing":
        (out / "finetuned" / "meta.json").unlink()
    elif what == "plan.json not UTF-8":
        (out / "compressed" / "plan.json").write_bytes(b"\xff\xfe{\x00")


@pytest.mark.parametrize(
    "what,redone",
    [
        ("verify.json missing", "verify"),
        ("verify.json corrupt", "verify"),
        ("export/model.onnx missing", "export"),
        ("finetuned/meta.json corrupt", "finetune"),
        ("finetuned/meta.json missing", "finetune"),
        ("plan.json not UTF-8", "compress"),
    ],
)
def test_damaged_stage_files_are_redone_not_trusted(
    run_dir, tiny_checkpoint, tmp_path, capsys, what, redone
):
    src, _ = run_dir
    out = tmp_path / "r"
    shutil.copytree(src, out)
    _stage_damage(out, what)
    s = run(out, RunConfig(target_ratio=3.0, **TINY), checkpoint=tiny_checkpoint, progress=True)
    text = capsys.readouterr().out
    assert f"[{redone}] its outputs are missing or corrupt" in text
    for p in ("finetuned/meta.json", "verify.json", "export/model.onnx", "compressed/plan.json"):
        assert (out / p).is_file(), p
    json.loads((out / "verify.json").read_text())
    tio.load_checkpoint(out / "finetuned")
    state = json.loads((out / "run.json").read_text())
    assert list(state["stages"]) == list(STAGES) and s["goal_met"]


# ----------------------------------------------------------------------------- latency records


def test_verify_records_latency_with_its_spread(run_dir):
    out, s = run_dir
    for key in ("dense", "compressed", "final"):
        for b in (1, 32):
            rec = s["rows"][key]["latency"][f"b{b}"]
            assert rec["batch"] == b and rec["device"] == "cpu" and rec["threads"] >= 1
            assert rec["reps"] == len(rec["times_ms"]) == 15 and rec["warmup"] == 3
            assert rec["q1_ms"] <= rec["median_ms"] <= rec["q3_ms"]
            assert s["rows"][key][f"latency_ms_b{b}"] == rec["median_ms"]  # read by old readers
    # dense, compressed and final were timed together: one session, paired rounds
    assert len({s["rows"][k]["latency"]["b1"]["session"] for k in s["rows"]}) == 1
    for b in (1, 32):
        sp = s["latency"][f"b{b}"]
        assert sp["paired"] and sp["a"] == "final" and sp["b"] == "dense"
        assert sp["text"].startswith("no measurable difference") == (not sp["measurable"])
    assert json.loads((out / "verify.json").read_text())["latency"] == s["latency"]


def _stats(name, times, session):
    from tensorcut.timing import latency_stats

    return latency_stats(
        name, times, batch=32, threads=2, device="cpu", warmup=3, session=session
    ).to_dict()


def test_latency_lines_say_median_iqr_threads_batch_device_and_the_verdict():
    from tensorcut.pipeline.run import latency_lines

    dense = [10.0, 14.0, 11.0, 13.0, 12.0]
    rows = {
        "dense": {"latency": {"b32": _stats("dense", dense, 5)}},
        "final": {"latency": {"b32": _stats("final", [8.0, 17.5, 11.0, 10.4, 15.0], 5)}},
    }
    lines = latency_lines({"rows": rows})
    assert lines[0] == (
        "latency dense: median 12.0 ms (IQR 11.0–13.0), batch 32, 2 threads, cpu, "
        "5 reps after 3 warm-up"
    )
    assert lines[1].startswith("latency final: median 11.0 ms (IQR 10.4–15.0), batch 32")
    assert lines[2].startswith("latency at batch 32: no measurable difference: final / dense = ")
    rows["final"]["latency"]["b32"] = _stats("final", [t / 2 for t in dense], 5)
    assert latency_lines({"rows": rows})[2] == (
        "latency at batch 32: final / dense = 0.50x (spread 0.50–0.50): final is faster"
    )


def test_latency_lines_read_old_run_directories():
    from tensorcut.pipeline.run import latency_lines

    rows = {"dense": {"latency_ms_b1": 2.0}, "final": {"latency_ms_b1": 1.5}}
    assert latency_lines({"rows": rows}) == [
        "latency at batch 1: medians dense 2.00 ms, final 1.50 ms (no timing spread recorded)"
    ]


def test_measure_models_uses_the_timer(monkeypatch):
    import torch

    import tensorcut.pipeline.run as trun

    seen = {}

    def fake(models, x, *, threads=None, warmup=3, reps=15, **kw):
        seen.update(names=list(models), shape=tuple(x.shape), warmup=warmup, reps=reps)
        return {n: _stats(n, [1.0] * reps, 9) for n in models}

    monkeypatch.setattr(trun, "measure_latency", fake)
    m = torch.nn.Conv2d(1, 2, 3).train()
    got = trun.measure_models({"a": m, "b": torch.nn.Conv2d(1, 2, 3)}, (1, 8, 8), 4)
    assert seen == {"names": ["a", "b"], "shape": (4, 1, 8, 8), "warmup": 3, "reps": 15}
    assert set(got) == {"a", "b"} and not m.training  # timed in evaluation mode


def test_run_checkpoints_record_their_lineage(run_dir):
    """Each checkpoint of a run reads back typed: where it came from, how, and how good."""
    out, s = run_dir
    dense, comp, final = (tio.read_info(out / d) for d in ("dense", "compressed", "finetuned"))
    assert comp.lineage.parent is not None and comp.lineage.parent.path == str(out / "dense")
    assert comp.lineage.parent.metrics == dense.metrics and comp.history is None
    assert final.lineage.plan == comp.lineage.plan is not None
    assert final.lineage.finetune is not None and final.lineage.finetune.train_images == 96
    state = json.loads((out / "run.json").read_text())
    assert state["stages"]["finetune"]["history"] == [
        r.to_dict() for r in final.finetune_history or ()
    ]
    for d in ("dense", "compressed", "finetuned"):
        assert tio.read_info(out / d).to_meta() == tio.read_meta(out / d)


def test_a_checkpoint_without_its_data_set_is_refused(tiny_checkpoint, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    meta = json.loads((ck / "meta.json").read_text())
    del meta["dataset"]  # as tensorcut.save(model, dir, meta) writes it without one
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TensorcutError) as e:
        run(tmp_path / "r", RunConfig(target_ratio=2.0, **TINY), checkpoint=ck, progress=False)
    assert str(e.value) == (
        "the checkpoint does not name its data set; `tensorcut run` needs it for calibration"
    )
