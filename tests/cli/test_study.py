"""`tensorcut analyze` and `tensorcut plot` end to end on digits (untrained tiny vanilla-cnn)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorcut.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tensorcut import models
    from tensorcut.checkpoint import io as tio

    kwargs = {"num_classes": 10, "in_channels": 1, "width": 0.125, "input_size": 8}
    d = tmp_path_factory.mktemp("ck")
    tio.save(
        models.create("vanilla-cnn", **kwargs),
        d,
        {
            "model": {"name": "vanilla-cnn", "kwargs": kwargs},
            "dataset": {"name": "digits", "seed": 0},
        },
    )
    return d


def test_analyze_then_plot(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.sqlite"
    args = [
        "analyze",
        str(ckpt),
        "--dataset",
        "digits",
        "--subset",
        "40",
        "--split",
        "val",
        "test",
        "--layers",
        "conv3",
        "--bipartitions",
        "OUT",
        "KW",
        "--keep",
        "OUT=2,8",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "conv3: cached rest-of-network evaluation" in text
    assert (
        "10 configurations evaluated, 0 already in" in text
    )  # per split: baseline, OUT keep 2 and 8, KW 1 and 2
    assert main(args) == 0
    assert "0 configurations evaluated, 10 already in" in capsys.readouterr().out
    assert (tmp_path / "r.csv").exists()
    assert main(["plot", str(out), "--out", str(tmp_path / "fig"), "--format", "png"]) == 0
    assert (tmp_path / "fig" / "accuracy_vs_norm_loss_OUT_test.png").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--bipartitions", "OUT-ZZ"],
            "unknown bipartition 'OUT-ZZ'; valid: OUT, IN, KH, KW, OUT-IN, OUT-KH, OUT-KW",
        ),
        (
            ["--layers", "conv9"],
            "unknown layer(s) 'conv9'; valid conv layers: conv1, conv2, conv3, conv4",
        ),
        (
            ["--layers", "conv3", "--bipartitions", "KW", "--keep", "4"],
            "keep=4 out of range for layer 'conv3' along KW (kernel (32, 16, 3, 3)): valid 1..3",
        ),
    ],
)
def test_analyze_bad_input(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code = main(
        [
            "analyze",
            str(ckpt),
            "--dataset",
            "digits",
            "--subset",
            "20",
            "--no-progress",
            "--out",
            str(tmp_path / "r.sqlite"),
            *extra,
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == f"tensorcut analyze: error: {message}"


def test_plot_missing_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "f")]) == 2
    assert "does not exist; run `tensorcut analyze` first" in capsys.readouterr().err
