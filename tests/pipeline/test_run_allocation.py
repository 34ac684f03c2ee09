"""`tensorcut run` applies the allocation it chose on calibration (and records which one)."""

import json

import tensorcut.pipeline.run as trun
from tensorcut.checkpoint import io as tio
from tensorcut.compression import CompressConfig, Plan, plan
from tensorcut.pipeline.run import RunConfig, run
from tensorcut.pipeline.workflow import input_shape_of

TINY = dict(
    calib_subset=64,
    finetune_epochs=1,
    finetune_lr=1e-3,
    curve_ratios=(2.0,),
    bipartitions=("OUT",),
    probe_images=64,
)


def test_error_allocation_is_applied_without_sensitivity(tiny_checkpoint, tmp_path, monkeypatch):
    real = trun._try_strategy

    def rigged(model, cfg, kind, *args, **kwargs):  # make "error" win the calibration
        r = real(model, cfg, kind, *args, **kwargs)
        return dict(r, top1=1.0 if kind == "error" else 0.0)

    real_probe = trun._probe

    def rigged_probe(kind, *args, **kwargs):  # ... and the probe fine-tune
        r = real_probe(kind, *args, **kwargs)
        return dict(r, top1=1.0 if kind == "error" else 0.0)

    monkeypatch.setattr(trun, "_try_strategy", rigged)
    monkeypatch.setattr(trun, "_probe", rigged_probe)
    out = tmp_path / "r"
    run(out, RunConfig(target_ratio=3.0, **TINY), checkpoint=tiny_checkpoint, progress=False)
    comp = json.loads((out / "run.json").read_text())["stages"]["compress"]
    assert comp["allocation"] == "error" and set(comp["calibration"]) == {
        "guided",
        "error",
        "uniform",
    }
    applied = Plan.load(out / "compressed" / "plan.json")
    ck = tio.load_checkpoint(tiny_checkpoint)
    expected = plan(
        ck.model,
        CompressConfig(method="tucker2", budget=1 / 3.0, budget_kind="params"),
        input_shape=input_shape_of(ck.meta),
        sensitivity=None,
        progress=False,
    )
    assert [l.ranks for l in applied.layers] == [l.ranks for l in expected.layers]
    assert all(l.sensitivity is None for l in applied.layers)


def test_without_probe_the_choice_is_made_right_after_compression(
    tiny_checkpoint, tmp_path, monkeypatch
):
    real = trun._try_strategy

    def rigged(model, cfg, kind, *args, **kwargs):
        r = real(model, cfg, kind, *args, **kwargs)
        return dict(r, top1=1.0 if kind == "uniform" else 0.0)

    def no_probe(*a, **k):  # must not be called
        raise AssertionError("probe ran with probe_epochs=0")

    monkeypatch.setattr(trun, "_try_strategy", rigged)
    monkeypatch.setattr(trun, "_probe", no_probe)
    out = tmp_path / "r"
    run(
        out,
        RunConfig(target_ratio=3.0, probe_epochs=0, **TINY),
        checkpoint=tiny_checkpoint,
        progress=False,
    )
    comp = json.loads((out / "run.json").read_text())["stages"]["compress"]
    assert comp["allocation"] == "uniform" and all(
        "probe" not in v for v in comp["calibration"].values()
    )
