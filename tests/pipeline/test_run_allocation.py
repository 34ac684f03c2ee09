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


def test_measured_allocation_and_layer_matching_when_asked_for(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """RunConfig(measured=True) measures the drops once (study/drops.json) and compares the
    measured allocation; match_epochs runs layer matching on the chosen model and records it."""
    real = trun._try_strategy

    def rigged(model, cfg, kind, *args, **kwargs):  # make "measured" win the calibration
        r = real(model, cfg, kind, *args, **kwargs)
        return dict(r, top1=1.0 if kind == "measured" else 0.0)

    monkeypatch.setattr(trun, "_try_strategy", rigged)
    out = tmp_path / "r"
    cfg = RunConfig(target_ratio=3.0, probe_epochs=0, measured=True, match_epochs=1, **TINY)
    run(out, cfg, checkpoint=tiny_checkpoint, progress=False)
    comp = json.loads((out / "run.json").read_text())["stages"]["compress"]
    assert comp["allocation"] == "measured" and set(comp["calibration"]) == set(trun.STRATEGIES)
    assert (out / "study" / "drops.json").exists()
    applied = Plan.load(out / "compressed" / "plan.json")
    assert applied.config["allocation"] == "measured"
    assert any(lp.measured is not None for lp in applied.layers)
    rec = tio.load_checkpoint(out / "compressed").info.lineage.layer_matching
    assert rec is not None and rec.after < rec.before and rec.images == TINY["calib_subset"]
    assert comp["layer_matching"] == rec.to_dict()


def test_matching_needs_batchnorm_re_estimation():
    import pytest

    from tensorcut.errors import TensorcutError

    with pytest.raises(TensorcutError, match="drop --no-bn-recalibrate"):
        RunConfig(target_ratio=3.0, match_epochs=1, bn_recalibrate=False)
    assert RunConfig(target_ratio=3.0).strategies == ("guided", "error", "uniform")
    assert RunConfig(target_ratio=3.0, measured=True).strategies == trun.STRATEGIES
