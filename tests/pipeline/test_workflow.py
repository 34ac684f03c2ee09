"""No verb replaces an existing output unless asked (--force / --in-place), and the old weights
outlive a kill; compress re-estimates BatchNorm statistics by default."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from tensorcut.checkpoint import io as tio
from tensorcut.cli import main
from tensorcut.compression import CompressConfig

pytestmark = pytest.mark.filterwarnings("ignore")

FT = ["--epochs", "1", "--subset", "64", "--batch-size", "32", "--device", "cpu"]


def _digest(path: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.is_file()
    }


def _one_line(capsys: Any, verb: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tensorcut {verb}: error: "), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


@pytest.fixture
def compressed(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    from tensorcut.pipeline.workflow import compress_checkpoint

    out = tmp_path / "small"
    compress_checkpoint(
        tiny_checkpoint, out, CompressConfig(method="tucker2", ratio=0.5), progress=False
    )
    return out


def test_finetune_without_out_or_in_place_is_refused(compressed: Path, capsys: Any) -> None:
    before = _digest(compressed)
    assert main(["finetune", str(compressed), *FT]) == 2
    _one_line(capsys, "finetune", "--out NEW_DIR", "--in-place")
    assert _digest(compressed) == before


def test_finetune_in_place_replaces_weights_keeps_the_plan_and_drops_stale_exports(
    compressed: Path, capsys: Any
) -> None:
    (compressed / "model.onnx").write_bytes(b"an export of the old weights")
    before = _digest(compressed)
    assert main(["finetune", str(compressed), "--in-place", *FT]) == 0
    after = _digest(compressed)
    assert after["model.safetensors"] != before["model.safetensors"]
    assert (
        after["plan.json"] == before["plan.json"]
        and "model.onnx" not in after
        and "train_state.pt" not in after
    )
    assert tio.load_checkpoint(compressed).meta["finetune_history"]
    assert sorted(p.name for p in compressed.parent.iterdir()) == [
        "small"
    ]  # no work folder left behind


def test_finetune_in_place_interrupted_keeps_the_old_weights(
    compressed: Path, monkeypatch: Any, capsys: Any
) -> None:
    import tensorcut.pipeline.workflow as wf

    real_fit = wf.fit

    def fit_then_killed(*args: Any, **kwargs: Any) -> Any:
        real_fit(*args, **kwargs)  # every epoch's checkpoint is written ...
        raise KeyboardInterrupt  # ... and the run dies before the end

    monkeypatch.setattr(wf, "fit", fit_then_killed)
    before = _digest(compressed)
    assert main(["finetune", str(compressed), "--in-place", *FT]) == 130
    assert _digest(compressed) == before


def test_compress_out_onto_another_checkpoint_needs_force(
    tiny_checkpoint: Path, tmp_path: Path, capsys: Any
) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    before = _digest(other)
    argv = ["compress", str(tiny_checkpoint), "--keep", "0.5", "--out", str(other)]
    assert main(argv) == 2
    _one_line(capsys, "compress", f"{other} already holds a checkpoint; pass --force")
    assert _digest(other) == before
    assert main([*argv, "--force"]) == 0
    assert (other / "plan.json").exists() and _digest(other)["model.safetensors"] != before[
        "model.safetensors"
    ]
    assert not (
        other / "train_state.pt"
    ).exists()  # the replaced checkpoint's training state went with it


def test_compress_again_into_its_own_output_needs_force(
    tiny_checkpoint: Path, compressed: Path, capsys: Any
) -> None:
    before = _digest(compressed)
    assert main(["compress", str(tiny_checkpoint), "--keep", "0.3", "--out", str(compressed)]) == 2
    _one_line(capsys, "compress", "already holds a checkpoint")
    assert _digest(compressed) == before


def test_finetune_out_onto_another_checkpoint_needs_force(
    compressed: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: Any
) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    before = _digest(other)
    assert main(["finetune", str(compressed), "--out", str(other), *FT]) == 2
    _one_line(capsys, "finetune", "already holds a checkpoint; pass --force")
    assert _digest(other) == before
    assert main(["finetune", str(compressed), "--out", str(other), "--force", *FT]) == 0
    assert tio.load_checkpoint(other).meta["finetune_history"]


@pytest.mark.parametrize("verb", ["compress", "finetune"])
def test_out_that_is_a_file(compressed: Path, tmp_path: Path, capsys: Any, verb: str) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    argv = (
        ["compress", str(compressed), "--keep", "0.5", "--out", str(f)]
        if verb == "compress"
        else ["finetune", str(compressed), "--out", str(f), *FT]
    )
    assert main(argv) == 2
    _one_line(capsys, verb, f"{f} is a file; give a directory path")
    assert f.read_text() == "keep me"


def test_finetune_resume_into_its_own_out_is_allowed(compressed: Path, tmp_path: Path) -> None:
    from tensorcut.pipeline.workflow import finetune_checkpoint
    from tensorcut.train.loop import FitConfig

    out = tmp_path / "ft"
    kw = dict(subset=64, batch_size=32, device="cpu", progress=False)
    finetune_checkpoint(
        compressed, out, config=FitConfig(epochs=1, lr=1e-4, scheduler="none"), **kw
    )
    ck = finetune_checkpoint(
        compressed, out, config=FitConfig(epochs=2, lr=1e-4, scheduler="none"), resume=True, **kw
    )
    assert [h["epoch"] for h in ck.meta["finetune_history"]] == [1, 2]


# ------------------------------------------------------------------------- BatchNorm after compress


def _bn_stats(model: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def test_compress_re_estimates_batchnorm_by_default(
    tiny_checkpoint: Path, tmp_path: Path, capsys: Any
) -> None:
    """The CLI's default re-estimates BatchNorm on up to 2048 training images, says so, and
    records it; the statistics equal an independent recalibration of the un-recalibrated model."""
    import json

    import torch

    from tensorcut import data as tdata
    from tensorcut.train.loop import recalibrate_bn

    argv = ["compress", str(tiny_checkpoint), "--method", "tucker2", "--keep", "0.5"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "on")]) == 0
    out = capsys.readouterr().out
    n_train = len(tdata.load_dataset("digits", "train"))  # 1294 < 2048: the whole split
    assert (
        f"BatchNorm statistics: re-estimated on {n_train} training images (6 layers) by default; "
        "--bn-images 0 keeps the trained ones" in out
    )
    rec = tio.load_checkpoint(tmp_path / "on").meta["bn_recalibration"]
    assert rec == {
        "batchnorm_layers": 6,
        "default": True,
        "requested": 2048,
        "data": "train split",
        "images": n_train,
    }
    assert json.loads((tmp_path / "on" / "plan.json").read_text())["bn_recalibration"] == rec

    assert main([*argv, "--bn-images", "0", "--out", str(tmp_path / "off")]) == 0
    assert "BatchNorm statistics: kept as trained (--bn-images 0)" in capsys.readouterr().out
    off = tio.load_checkpoint(tmp_path / "off")
    assert "bn_recalibration" not in off.meta
    dense = _bn_stats(tio.load(tiny_checkpoint))
    assert all(torch.equal(v, dense[k]) for k, v in _bn_stats(off.model).items())

    # independent: recalibrate the --bn-images 0 model on the same images
    ds = tdata.load_dataset("digits", "train", subset=2048)
    recalibrate_bn(off.model, tdata.make_loader(ds, 128))
    want, got = _bn_stats(off.model), _bn_stats(tio.load(tmp_path / "on"))
    assert set(want) == set(got)
    for k in want:  # same batches; float32 sums in possibly another order
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(got[k], dense[k]) for k in got if "running_mean" in k)


def test_compress_default_skips_batchnorm_when_the_data_set_is_missing(
    tiny_checkpoint: Path, tmp_path: Path, capsys: Any
) -> None:
    """Without the data set the default says why it skipped; an explicit --bn-images N refuses."""
    import json

    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, src)
    meta = json.loads((src / "meta.json").read_text())
    meta["dataset"].update(name="fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    (src / "meta.json").write_text(json.dumps(meta))
    argv = ["compress", str(src), "--method", "tucker2", "--keep", "0.5"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm statistics: not re-estimated, its data set is not available (" in out
    rec = tio.load_checkpoint(tmp_path / "a").meta["bn_recalibration"]
    assert rec["images"] == 0 and rec["default"] and "fashion-mnist not found" in rec["skipped"]

    assert main([*argv, "--bn-images", "64", "--out", str(tmp_path / "b")]) == 2
    _one_line(capsys, "compress", "fashion-mnist not found")
    assert not (tmp_path / "b").exists()


def test_compress_json_reports_the_batchnorm_record(
    tiny_checkpoint: Path, tmp_path: Path, capsys: Any
) -> None:
    import json

    capsys.readouterr()
    argv = ["compress", str(tiny_checkpoint), "--keep", "0.5", "--bn-images", "64", "--json"]
    assert main([*argv, "--out", str(tmp_path / "j")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bn_recalibration"]["images"] == 64 and doc["bn_recalibration"]["default"] is False


@pytest.mark.parametrize(
    ("record", "line"),
    [
        (None, "BatchNorm statistics: kept as trained (--bn-images 0)"),
        (
            {"batchnorm_layers": 3, "default": True, "images": 0, "skipped": "no data"},
            "BatchNorm statistics: not re-estimated, no data",
        ),
        (
            {"batchnorm_layers": 3, "default": True, "requested": 2048, "data": "train split"}
            | {"images": 1294},
            "BatchNorm statistics: re-estimated on 1294 training images (3 layers) by default; "
            "--bn-images 0 keeps the trained ones",
        ),
        (
            {"batchnorm_layers": 2, "default": False, "data": "given batches", "images": None},
            "BatchNorm statistics: re-estimated on given batches (2 layers)",
        ),
    ],
)
def test_bn_recalibration_line_from_the_record_or_its_json(record: Any, line: str) -> None:
    from tensorcut.checkpoint import BatchNormRecord
    from tensorcut.pipeline.workflow import bn_recalibration_line

    assert bn_recalibration_line(record) == line
    if record is not None:
        assert bn_recalibration_line(BatchNormRecord.from_dict(record, "bn_recalibration")) == line


# ------------------------------------------------------ layer matching and the measured allocation

MEASURED = CompressConfig(method="tucker2", budget=0.5, budget_kind="macs", allocation="measured")


def test_layer_matching_lowers_the_recorded_output_error(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """swap -> BN -> matching -> BN: the record says the matching error fell; only the factors
    changed against the same plan without matching, and plan.json repeats the record."""
    import json

    import torch

    from tensorcut.checkpoint import MatchRecord
    from tensorcut.pipeline.workflow import compress_checkpoint, match_line

    cfg = CompressConfig(method="tucker2", ratio=0.3)
    _, p, meta = compress_checkpoint(
        tiny_checkpoint, tmp_path / "m", cfg, bn_images=64, match_epochs=2, progress=False
    )
    rec = MatchRecord.from_dict(meta["layer_matching"], "layer_matching")
    assert rec.after < rec.before and rec.images == 64 and rec.bn_after
    assert (rec.epochs, rec.steps, rec.lr) == (2, 2, 1e-3)  # 64 images: one batch of 128 a pass
    assert json.loads((tmp_path / "m" / "plan.json").read_text())["layer_matching"] == rec.to_dict()
    assert tio.load_checkpoint(tmp_path / "m").info.lineage.layer_matching == rec
    line = match_line(rec)
    assert line is not None and line.startswith("layer matching: 2 epoch(s) on 64 calibration")
    # same plan, no matching: the factors differ, the rest of the weights do not
    _, p0, meta0 = compress_checkpoint(
        tiny_checkpoint, tmp_path / "n", cfg, bn_images=64, progress=False
    )
    assert "layer_matching" not in meta0 and [lp.ranks for lp in p0.layers] == [
        lp.ranks for lp in p.layers
    ]
    a, b = tio.load(tmp_path / "m").state_dict(), tio.load(tmp_path / "n").state_dict()
    factorized = {lp.name for lp in p.layers if lp.status == "factorize"}
    changed = {k for k in a if "running_" not in k and not torch.equal(a[k], b[k])}
    assert changed and all(any(k.startswith(f + ".") for f in factorized) for k in changed)


def test_measured_allocation_measures_saves_and_reuses_the_drops(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    import tensorcut.compression.measured as measured
    from tensorcut.compression.measured import DropTable
    from tensorcut.pipeline.workflow import compress_checkpoint

    _, p, _ = compress_checkpoint(tiny_checkpoint, tmp_path / "a", MEASURED, bn_images=64)
    table = DropTable.load(tmp_path / "a" / "drops.json")
    assert table.images == 64 and table.methods == ["tucker2"]
    assert p.config["allocation"] == "measured"
    measured_layers = [lp for lp in p.layers if lp.measured is not None]
    assert measured_layers and {lp.name for lp in measured_layers} == {
        ld.name for ld in table.layers
    }

    def no_measuring(*a: Any, **k: Any) -> Any:
        raise AssertionError("measured again although --drops was given")

    monkeypatch.setattr(measured, "measure_layer_drops", no_measuring)
    _, again, _ = compress_checkpoint(
        tiny_checkpoint, tmp_path / "b", MEASURED, bn_images=64, drops=tmp_path / "a" / "drops.json"
    )
    assert [lp.ranks for lp in again.layers] == [lp.ranks for lp in p.layers]
    assert not (tmp_path / "b" / "drops.json").exists()  # reused, not measured: nothing to save


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (
            dict(match_epochs=1, bn_images=0),
            "--match-epochs fits the layers on the --bn-images calibration images",
        ),
        (dict(match_epochs=-1), "--match-epochs must be an integer >= 0, got -1"),
        (dict(match_epochs=1, match_lr=0.0), "--match-lr must be a finite number > 0, got 0.0"),
        (
            dict(config=MEASURED, bn_images=0),
            "--allocation measured measures each layer on the --bn-images calibration images",
        ),
        (dict(drops="d.json"), "--drops is read by --allocation measured;"),
    ],
)
def test_recovery_settings_are_refused_before_any_work(
    tiny_checkpoint: Path, tmp_path: Path, kw: dict[str, Any], msg: str
) -> None:
    from tensorcut.errors import TensorcutError
    from tensorcut.pipeline.workflow import compress_checkpoint

    cfg = kw.pop("config", CompressConfig(method="tucker2", ratio=0.5))
    with pytest.raises(TensorcutError) as e:
        compress_checkpoint(tmp_path / "no-such-checkpoint", tmp_path / "o", cfg, **kw)
    assert str(e.value).startswith(msg)  # checked before the checkpoint is even read
    assert not (tmp_path / "o").exists()
