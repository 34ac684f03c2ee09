"""No verb replaces an existing output unless asked (--force / --in-place), and the old weights outlive a kill."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from tensorcut import io as tio
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
    from tensorcut.workflow import compress_checkpoint

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
    import tensorcut.workflow as wf

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
    from tensorcut.train.loop import FitConfig
    from tensorcut.workflow import finetune_checkpoint

    out = tmp_path / "ft"
    kw = dict(subset=64, batch_size=32, device="cpu", progress=False)
    finetune_checkpoint(
        compressed, out, config=FitConfig(epochs=1, lr=1e-4, scheduler="none"), **kw
    )
    ck = finetune_checkpoint(
        compressed, out, config=FitConfig(epochs=2, lr=1e-4, scheduler="none"), resume=True, **kw
    )
    assert [h["epoch"] for h in ck.meta["finetune_history"]] == [1, 2]
