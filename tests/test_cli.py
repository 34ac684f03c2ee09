"""CLI: verbs run, bad input gives one line on stderr and exit status 2."""

import json
import subprocess
import sys

import pytest

from tensorcut.cli import main


def test_inspect_model_name_table(capsys):
    assert main(["inspect", "resnet20", "--dataset", "digits", "--width", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "total (whole model)" in out and "MACs are multiply-accumulates per image at input 1x8x8" in out


def test_inspect_checkpoint_json(tiny_checkpoint, capsys):
    assert main(["inspect", str(tiny_checkpoint), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in s["rows"]]
    assert names[:4] == ["conv1", "conv2", "conv3", "conv4"]
    assert s["total_params"] > sum(r["params"] for r in s["rows"])  # BatchNorm parameters are not in conv/linear rows
    conv1 = s["rows"][0]
    # conv1 of width-0.125 vanilla-cnn on digits: 16 filters 1x5x5 on 8x8 output
    assert conv1["params"] == 16 * 25 + 16 and conv1["macs"] == 16 * 25 * 64


def test_evaluate_checkpoint(tiny_checkpoint, capsys):
    assert main(["evaluate", str(tiny_checkpoint), "--split", "val", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert 0 <= m["top1"] <= m["top5"] <= 1


@pytest.mark.parametrize("argv,msg", [
    (["inspect", "resnet9"], "unknown model 'resnet9'; choose one of"),
    (["train", "--model", "vgg11", "--dataset", "mnist", "--out", "x"], "unknown dataset 'mnist'"),
    (["evaluate", "/nonexistent"], "is not a checkpoint directory"),
])
def test_bad_input_one_line_exit_2(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_corrupt_checkpoint_via_subprocess(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text((tiny_checkpoint / "meta.json").read_text())
    (bad / "model.safetensors").write_bytes((tiny_checkpoint / "model.safetensors").read_bytes()[:500])
    r = subprocess.run([sys.executable, "-m", "tensorcut", "evaluate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "truncated or corrupt" in r.stderr


def test_demo_fast(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--fast"]) == 0
    out = capsys.readouterr().out
    assert "goal: conv-layer compression ratio >= 5" in out and "report: " in out
    for f in ("dense/model.safetensors", "finetuned/model.safetensors", "export/model.onnx", "report.html"):
        assert (tmp_path / "d" / f).exists(), f


def test_train_amp_flag_reaches_the_recipe(tmp_path, capsys):
    assert main(["train", "--model", "vanilla-cnn", "--dataset", "synthetic", "--width", "0.125", "--epochs", "1",
                 "--subset", "64", "--amp", "--device", "cpu", "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["metrics"]["test"]["n"] > 0
    from tensorcut.workflow_cli import finetune_config
    from tensorcut.cli import build_parser

    cfg = finetune_config(build_parser().parse_args(["finetune", "CK", "--amp"]))
    assert cfg.amp and not cfg.sync_batchnorm and cfg.lr == 1e-5
