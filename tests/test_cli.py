"""CLI: verbs run, bad input gives one line on stderr and exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tensorcut.cli import main


def test_inspect_model_name_table(capsys):
    assert main(["inspect", "resnet20", "--dataset", "digits", "--width", "0.25"]) == 0
    out = capsys.readouterr().out
    assert (
        "layer1.0.conv1" in out
        and "total (whole model)" in out
        and "MACs are multiply-accumulates per image at input 1x8x8" in out
    )


def test_inspect_checkpoint_json(tiny_checkpoint, capsys):
    assert main(["inspect", str(tiny_checkpoint), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in s["rows"]]
    assert names[:4] == ["conv1", "conv2", "conv3", "conv4"]
    assert s["total_params"] > sum(
        r["params"] for r in s["rows"]
    )  # BatchNorm parameters are not in conv/linear rows
    conv1 = s["rows"][0]
    # conv1 of width-0.125 vanilla-cnn on digits: 16 filters 1x5x5 on 8x8 output
    assert conv1["params"] == 16 * 25 + 16 and conv1["macs"] == 16 * 25 * 64


def test_evaluate_checkpoint(tiny_checkpoint, capsys):
    assert main(["evaluate", str(tiny_checkpoint), "--split", "val", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert 0 <= m["top1"] <= m["top5"] <= 1


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["inspect", "resnet9"], "unknown model 'resnet9'; choose one of"),
        (
            ["train", "--model", "vgg11", "--dataset", "mnist", "--out", "x"],
            "unknown dataset 'mnist'",
        ),
        (["evaluate", "/nonexistent"], "is not a checkpoint directory"),
    ],
)
def test_bad_input_one_line_exit_2(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_corrupt_checkpoint_via_subprocess(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text((tiny_checkpoint / "meta.json").read_text())
    (bad / "model.safetensors").write_bytes(
        (tiny_checkpoint / "model.safetensors").read_bytes()[:500]
    )
    r = subprocess.run(
        [sys.executable, "-m", "tensorcut", "evaluate", str(bad)], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "truncated or corrupt" in r.stderr


def test_demo_fast(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--fast"]) == 0
    out = capsys.readouterr().out
    assert "goal: conv-layer compression ratio >= 5" in out and "report: " in out
    for f in (
        "dense/model.safetensors",
        "finetuned/model.safetensors",
        "export/model.onnx",
        "report.html",
    ):
        assert (tmp_path / "d" / f).exists(), f


def test_train_amp_flag_reaches_the_recipe(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--model",
                "vanilla-cnn",
                "--dataset",
                "synthetic",
                "--width",
                "0.125",
                "--epochs",
                "1",
                "--subset",
                "64",
                "--amp",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["metrics"]["test"]["n"] > 0
    from tensorcut.cli import build_parser
    from tensorcut.cli.workflow import finetune_config

    cfg = finetune_config(build_parser().parse_args(["finetune", "CK", "--amp"]))
    assert cfg.amp and not cfg.sync_batchnorm and cfg.lr == 1e-5


# ----------------------------------------------------------------------- manners (issue 18, item 7)


def _verb_parsers():
    from tensorcut.cli import build_parser, verb_parsers

    return verb_parsers(build_parser())


def test_every_option_of_every_verb_has_help():
    missing = [
        f"{verb} {a.option_strings or a.dest}"
        for verb, p in _verb_parsers().items()
        for a in p._actions
        if not (a.help or "").strip()
    ]
    assert missing == []


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "(default: 128)" in out and "(default: 10)" in out and "(default: None)" not in out


def test_every_verb_has_json():
    assert [
        v
        for v, p in _verb_parsers().items()
        if not any("--json" in a.option_strings for a in p._actions)
    ] == []


def test_bare_tensorcut_is_usage_and_choose_a_verb_on_stderr(capsys):
    assert main([]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.startswith("usage: tensorcut") and "tensorcut: error: choose a verb" in cap.err


def test_closed_pipe_ends_quietly():
    # the reader closes the pipe before tensorcut writes a byte: every write meets EPIPE
    p = subprocess.Popen(
        [sys.executable, "-m", "tensorcut", "inspect", "resnet20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=300)
    assert (
        "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err
    ), err
    assert p.returncode == 141


def test_compress_keep_and_deprecated_ratio(tiny_checkpoint, tmp_path, capsys):
    assert (
        main(
            [
                "compress",
                str(tiny_checkpoint),
                "--keep",
                "0.5",
                "--out",
                str(tmp_path / "a"),
                "--json",
            ]
        )
        == 0
    )
    a = json.loads(capsys.readouterr().out)
    with pytest.warns(FutureWarning, match="--ratio is deprecated; use --keep 0.5"):
        assert (
            main(
                [
                    "compress",
                    str(tiny_checkpoint),
                    "--ratio",
                    "0.5",
                    "--out",
                    str(tmp_path / "b"),
                    "--json",
                ]
            )
            == 0
        )
    b = json.loads(capsys.readouterr().out)
    assert a["config"]["ratio"] == b["config"]["ratio"] == 0.5 and a["layers"] == b["layers"]


def test_deprecation_warning_is_one_line_at_the_console(tiny_checkpoint, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorcut",
            "compress",
            str(tiny_checkpoint),
            "--ratio",
            "0.5",
            "--out",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stderr.splitlines() if "deprecated" in ln] == [
        "tensorcut compress: warning: --ratio is deprecated; use --keep 0.5 (the fraction of each "
        "layer's parameters kept)"
    ]


def test_target_ratio_is_documented_as_a_compression_factor(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "compression factor to reach: dense / compressed" in out and "--subset N" in out


@pytest.mark.parametrize(
    "argv,keys",
    [
        (["inspect", "--list", "--json"], {"resnet20", "vanilla-cnn"}),
        (
            ["inspect", "vanilla-cnn", "--dataset", "digits", "--width", "0.125", "--json"],
            {"rows", "total_params"},
        ),
        (["evaluate", "{ck}", "--split", "val", "--json"], {"top1", "top5", "loss", "n"}),
        (
            ["export", "{ck}", "--format", "torchscript", "--out", "{tmp}/m.pt", "--json"],
            {"path", "checked", "check"},
        ),
        (
            [
                "train",
                "--model",
                "vanilla-cnn",
                "--dataset",
                "digits",
                "--width",
                "0.125",
                "--epochs",
                "1",
                "--subset",
                "64",
                "--device",
                "cpu",
                "--out",
                "{tmp}/t",
                "--json",
            ],
            {"checkpoint", "test", "epochs"},
        ),
        (["compress", "{ck}", "--keep", "0.5", "--out", "{tmp}/c", "--json"], {"config", "layers"}),
        (
            [
                "analyze",
                "{ck}",
                "--subset",
                "40",
                "--bipartitions",
                "OUT",
                "--keep",
                "1,2",
                "--layers",
                "conv2",
                "--out",
                "{tmp}/r.sqlite",
                "--plots",
                "{tmp}/figs",
                "--json",
            ],
            {"evaluated", "csv", "baseline", "figures"},
        ),
    ],
)
def test_json_result_alone_on_stdout(argv, keys, tiny_checkpoint, tmp_path, capsys):
    argv = [a.format(ck=tiny_checkpoint, tmp=tmp_path) for a in argv]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)  # nothing but the JSON document on stdout
    assert keys <= set(r)


def test_finetune_and_plot_json(tiny_checkpoint, tmp_path, capsys):
    c = tmp_path / "c"
    assert main(["compress", str(tiny_checkpoint), "--keep", "0.5", "--out", str(c)]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "finetune",
                str(c),
                "--out",
                str(tmp_path / "ft"),
                "--epochs",
                "1",
                "--subset",
                "64",
                "--device",
                "cpu",
                "--json",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert (
        r["epochs"] == 1 and 0 <= r["test"]["top1"] <= 1 and r["checkpoint"] == str(tmp_path / "ft")
    )
    assert (
        main(
            [
                "analyze",
                str(tiny_checkpoint),
                "--subset",
                "40",
                "--bipartitions",
                "OUT",
                "--keep",
                "1",
                "--layers",
                "conv2",
                "--out",
                str(tmp_path / "r.sqlite"),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "plot",
                str(tmp_path / "r.sqlite"),
                "--out",
                str(tmp_path / "f"),
                "--format",
                "png",
                "--json",
            ]
        )
        == 0
    )
    files = json.loads(capsys.readouterr().out)["figures"]
    assert files and all(Path(f).exists() for f in files)


def _fake_latency(models, example, *, threads=None, warmup=0, reps=5, **kw):
    """Deterministic stand-in for timing.measure_latency: fewer parameters run faster, every conv
    call costs a little; a factorized whole model is timed as its parameters say."""
    from torch import nn

    from tensorcut.timing import latency_stats

    out = {}
    for n, m in models.items():
        params = sum(p.numel() for p in m.parameters())
        calls = sum(isinstance(s, nn.Conv2d) for s in m.modules())
        out[n] = latency_stats(
            n,
            [params / 1e4 + 0.001 * calls] * reps,
            batch=int(example.shape[0]),
            threads=1,
            device="cpu",
            warmup=warmup,
            session=7,
        )
    return out


def test_compress_target_speedup_json_and_text(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import tensorcut.compression.speed_plan as speed_plan

    monkeypatch.setattr(speed_plan, "measure_latency", _fake_latency)
    argv = ["compress", str(tiny_checkpoint), "--target-speedup", "1.2", "--bn-images", "0"]
    assert main([*argv, "--out", str(tmp_path / "j"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # the speed planner's progress goes to stderr
    assert doc["config"]["target_speedup"] == 1.2
    sp = doc["config"]["speed"]
    assert sp["met"] and sp["threads"] == 1 and sp["batch"] == 1 and sp["device"] == "cpu"
    assert "predicted_ms" in sp and "measured_ms" in sp and "fell_back_to_dense" not in sp
    assert any(lp["status"] == "factorize" for lp in doc["layers"])
    assert main([*argv, "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "speed target 1.2x (1 thread, batch 1, cpu, channels-last): dense median" in out
    assert "measured whole model, interleaved with dense:" in out


def test_compress_target_speedup_excludes_rank_rules(tiny_checkpoint, tmp_path, capsys):
    argv = ["compress", str(tiny_checkpoint), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--keep", "0.5", "--target-speedup", "1.5"])
    assert e.value.code == 2
    assert "argument --target-speedup: not allowed with argument --keep" in capsys.readouterr().err
    assert main([*argv, "--target-speedup", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "tensorcut compress: error: target_speedup must be a number > 1 (e.g. 1.5 for 1.5x "
        "faster), got 1.0"
    ]
    assert not (tmp_path / "x").exists()


def test_compress_target_speedup_writes_nothing_when_dense_is_fastest(
    tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    import tensorcut.compression.speed_plan as speed_plan

    def slow_factorized(models, example, **kw):
        from tensorcut.layers import FactorizedConv2d

        st = _fake_latency(models, example, **kw)
        for n, m in models.items():  # any factorized form is far slower
            if any(isinstance(s, FactorizedConv2d) for s in m.modules()):
                st[n] = _fake_latency({n: m}, example, **kw)[n].__class__(
                    n, tuple(t + 100 for t in st[n].times_ms), 1, 1, "cpu", 0, 7
                )
        return st

    monkeypatch.setattr(speed_plan, "measure_latency", slow_factorized)
    argv = ["compress", str(tiny_checkpoint), "--target-speedup", "1.5", "--bn-images", "0"]
    assert main([*argv, "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "tensorcut compress: error: no layer runs faster factorized on this machine (conv2: not "
        "faster;"
    ), err
    assert err[0].endswith("the dense model is the fastest here, so nothing was written")
    assert not (tmp_path / "n").exists()


def test_inspect_latency_uses_the_one_timer(capsys) -> None:
    """``inspect --latency``: median and IQR with threads, batch and device, in text and JSON."""
    from tensorcut.cli import main

    argv = ["inspect", "resnet20", "--width", "0.25", "--latency", "--threads", "1"]
    assert main([*argv, "--batch", "2", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)["latency"]["stats"]["model"]
    assert (st["batch"], st["threads"], st["device"], st["reps"]) == (2, 1, "cpu", 15)
    assert len(st["times_ms"]) == 15 and st["q1_ms"] <= st["median_ms"] <= st["q3_ms"]
    assert main(argv) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("latency, model: median ") and "IQR" in line and "1 thread" in line
    assert main([*argv, "--batch", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tensorcut inspect: error: --batch and --threads must be >= 1"
    )
