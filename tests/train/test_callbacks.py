"""fit()'s callbacks (tensorcut.train.callbacks): early stopping, checkpoints, the protocol.

Validation losses are scripted where the epoch count matters: a callback overwrites the row's
``val_loss`` from a table indexed by the epoch (it runs before early stopping decides), so the
expected stop is known exactly and survives a resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_util import join_as_rank, spawn_ranks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tensorcut import distributed as tdist
from tensorcut.checkpoint import io as tio
from tensorcut.errors import TensorcutError
from tensorcut.train import Callback, Checkpoint, EarlyStopping, FitConfig, FitState, fit
from tensorcut.train.callbacks import TRAIN_STATE, check_checkpoint_meta, load_train_state

pytestmark = pytest.mark.usefixtures("one_thread")

META = {"model": {"name": "custom", "kwargs": {}}}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.2),  # the RNG stream matters: a resumed run must draw the same masks
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, 6, 6, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    return (
        DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
        DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16),
    )


CFG = dict(optimizer="sgd", lr=0.05, scheduler="none", seed=4)


class Scripted(Callback):
    """Replace each row's ``val_loss`` by ``losses[epoch - 1]`` (the real one kept as
    ``real_val_loss``) and remember the weights after every epoch."""

    def __init__(self, losses: list[float]) -> None:
        self.losses = losses
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, row: dict[str, Any], fit: FitState) -> None:
        row["real_val_loss"] = row["val_loss"]
        row["val_loss"] = self.losses[row["epoch"] - 1]
        self.weights[row["epoch"]] = {k: v.clone() for k, v in fit.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _untimed(hist: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in hist]


# ------------------------------------------------------------------------ early stopping


@pytest.mark.parametrize(
    ("losses", "patience", "epochs_run", "best_epoch"),
    [
        ([1.0, 0.9, 0.95, 0.96, 0.8, 0.7], 2, 4, 2),  # two epochs without a better loss
        ([1.0, 0.9, 0.95, 0.85, 0.99, 0.98], 2, 6, 4),  # 0.85 resets the count
        ([1.0, 1.0, 1.0, 1.0], 3, 4, 1),  # equal is not better
        ([1.0, 0.9, 0.8, 0.7], 1, 4, 4),  # always improving: runs every epoch
    ],
)
def test_fit_patience_stops_after_the_right_epoch_and_restores_the_best(
    losses: list[float], patience: int, epochs_run: int, best_epoch: int
) -> None:
    tr, va = _loaders()
    net = _net()
    script = Scripted(losses)
    hist = fit(
        net, tr, va, FitConfig(epochs=len(losses), patience=patience, **CFG), device="cpu",
        progress=False, distributed=False, callbacks=[script],
    )  # fmt: skip
    assert [r["epoch"] for r in hist] == list(range(1, epochs_run + 1))
    assert _same(net.state_dict(), script.weights[best_epoch])


def test_early_stopping_monitor_max_and_min_delta() -> None:
    tr, va = _loaders()
    top1 = [0.5, 0.6, 0.605, 0.61, 0.9]

    class Top1(Callback):
        def on_epoch_end(self, row: dict[str, Any], fit: FitState) -> None:
            row["val_top1"] = top1[row["epoch"] - 1]

    stop = EarlyStopping(2, monitor="val_top1", mode="max", min_delta=0.02)
    hist = fit(
        _net(), tr, va, FitConfig(epochs=5, **CFG), device="cpu", progress=False,
        distributed=False, callbacks=[Top1(), stop],
    )  # fmt: skip
    assert len(hist) == 4  # 0.605 and 0.61 are within min_delta of 0.6
    assert (stop.best_epoch, stop.stopped_epoch, stop.best) == (2, 4, 0.6)


def test_early_stopping_without_validation_never_stops() -> None:
    tr, _ = _loaders()
    stop = EarlyStopping(1)
    hist = fit(
        _net(), tr, None, FitConfig(epochs=3, **CFG), device="cpu", progress=False,
        distributed=False, callbacks=[stop],
    )  # fmt: skip
    assert len(hist) == 3 and stop.stopped_epoch is None and stop.best_state is None


def test_early_stopping_without_restore_keeps_the_last_weights() -> None:
    tr, va = _loaders()
    script = Scripted([1.0, 2.0, 3.0])
    net = _net()
    fit(
        net, tr, va, FitConfig(epochs=3, **CFG), device="cpu", progress=False, distributed=False,
        callbacks=[script, EarlyStopping(2, restore_best=False)],
    )  # fmt: skip
    assert _same(net.state_dict(), script.weights[3])


def test_a_user_callback_stops_training() -> None:
    tr, va = _loaders()
    seen: list[str] = []

    class StopAtTwo(Callback):
        def on_fit_start(self, fit: FitState) -> None:
            seen.append("start")

        def after_epoch(self, row: dict[str, Any], fit: FitState) -> None:
            seen.append(f"after {row['epoch']} ({len(fit.history)} recorded)")
            fit.stop = row["epoch"] == 2

        def on_fit_end(self, fit: FitState) -> None:
            seen.append(f"end at {fit.epoch}")

    hist = fit(
        _net(), tr, va, FitConfig(epochs=5, **CFG), device="cpu", progress=False,
        distributed=False, callbacks=[StopAtTwo()],
    )  # fmt: skip
    assert len(hist) == 2
    assert seen == ["start", "after 1 (1 recorded)", "after 2 (2 recorded)", "end at 2"]


def test_hooks_run_in_order_with_plain_functions() -> None:
    tr, _ = _loaders()
    calls: list[str] = []

    class Obj(Callback):
        def on_epoch_end(self, row: dict[str, Any], fit: FitState) -> None:
            calls.append(f"obj {row['epoch']} sees {row.get('plain')}")

    def plain(row: dict[str, Any], model: nn.Module) -> None:
        row["plain"] = row["epoch"] * 10
        calls.append(f"plain {row['epoch']}")

    hist = fit(
        _net(), tr, None, FitConfig(epochs=2, **CFG), device="cpu", progress=False,
        distributed=False, callbacks=[plain, Obj()], on_epoch=lambda r: calls.append("on_epoch"),
    )  # fmt: skip
    assert calls == ["plain 1", "obj 1 sees 10", "on_epoch", "plain 2", "obj 2 sees 20", "on_epoch"]
    assert [r["plain"] for r in hist] == [10, 20]


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_callback_writes_every_epoch_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tr, va = _loaders()
    out = tmp_path / "ck"
    written: list[tuple[str, int]] = []
    real = tio.atomic_write_bytes

    def spy(path: Any, data: bytes) -> None:
        written.append((Path(path).name, len(data)))
        real(path, data)

    monkeypatch.setattr(tio, "atomic_write_bytes", spy)
    net = _net()
    hist = fit(
        net, tr, va, FitConfig(epochs=2, **CFG), device="cpu", progress=False, distributed=False,
        callbacks=[Checkpoint(out, META)],
    )  # fmt: skip
    names = [n for n, _ in written]
    assert names.count(TRAIN_STATE) == 2 and names.count("meta.json") == 2
    assert names.index(TRAIN_STATE) > names.index("meta.json")  # weights and meta first
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "model.safetensors", TRAIN_STATE]
    st = load_train_state(out / TRAIN_STATE, torch.device("cpu"))
    assert st["epoch"] == 2 and json.loads(st["history"]) == json.loads(json.dumps(hist))
    assert _same(st["model"], net.state_dict())
    assert tio.read_meta(out)["epoch"] == 2

    # a write that fails half-way leaves the previous files whole and no temporary file
    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    before = (out / TRAIN_STATE).read_bytes()
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(TensorcutError, match="free disk space"):
        fit(
            _net(), tr, va, FitConfig(epochs=3, **CFG), device="cpu", progress=False,
            distributed=False, callbacks=[Checkpoint(out, META, resume=True)],
        )  # fmt: skip
    monkeypatch.undo()
    assert (out / TRAIN_STATE).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "model.safetensors", TRAIN_STATE]


def _run(out: Path | None, epochs: int, resume: bool = False, **kw: Any) -> Any:
    tr, va = _loaders()
    net = _net()
    script = Scripted([1.0, 0.8, 0.9, 0.95, 0.97, 0.6])
    hist = fit(
        net, tr, va, FitConfig(epochs=epochs, patience=3, **CFG), device="cpu", progress=False,
        distributed=False, callbacks=[script], out_dir=out, meta=META, resume=resume, **kw,
    )  # fmt: skip
    return net, hist, script


def test_resume_reproduces_the_uninterrupted_run_early_stopping_included(tmp_path: Path) -> None:
    """Shuffled batches, dropout, BatchNorm, SGD momentum and an early stop whose best epoch (2)
    lies before the interruption (after epoch 3): the resumed run stops at epoch 5 with the
    weights of epoch 2, bitwise as the uninterrupted run."""
    whole, hist_whole, script = _run(tmp_path / "whole", 6)
    assert len(hist_whole) == 5 and _same(whole.state_dict(), script.weights[2])
    _run(tmp_path / "cut", 3)
    resumed, hist_resumed, _ = _run(tmp_path / "cut", 6, resume=True)
    assert _untimed(hist_resumed) == _untimed(hist_whole)
    assert _same(resumed.state_dict(), whole.state_dict())
    for d in ("whole", "cut"):  # the last checkpoint holds the restored best weights
        assert _same(tio.load(tmp_path / d, model=_net()).state_dict(), script.weights[2])


def test_callbacks_passed_by_hand_equal_out_dir_and_patience(tmp_path: Path) -> None:
    a, hist_a, _ = _run(tmp_path / "a", 6)
    tr, va = _loaders()
    b = _net()
    script = Scripted([1.0, 0.8, 0.9, 0.95, 0.97, 0.6])
    hist_b = fit(
        b, tr, va, FitConfig(epochs=6, **CFG), device="cpu", progress=False, distributed=False,
        callbacks=[script, EarlyStopping(3), Checkpoint(tmp_path / "b", META)],
    )  # fmt: skip
    assert _untimed(hist_a) == _untimed(hist_b) and _same(a.state_dict(), b.state_dict())
    sa = load_train_state(tmp_path / "a" / TRAIN_STATE, torch.device("cpu"))
    sb = load_train_state(tmp_path / "b" / TRAIN_STATE, torch.device("cpu"))
    assert sa.keys() == sb.keys() and sa["callbacks"].keys() == {"EarlyStopping"}
    assert sa["callbacks"]["EarlyStopping"]["bad_epochs"] == 3


def test_resume_reads_a_state_written_before_early_stopping_was_a_callback(
    tmp_path: Path,
) -> None:
    """Old train_state.pt files keep best_loss / bad_epochs at the top level."""
    out = tmp_path / "ck"
    _run(out, 3)
    st = torch.load(out / TRAIN_STATE, weights_only=True)
    es = st.pop("callbacks")["EarlyStopping"]
    st.update(best_loss=es["best"], bad_epochs=es["bad_epochs"])
    torch.save(st, out / TRAIN_STATE)
    stop = EarlyStopping(3)
    tr, va = _loaders()
    hist = fit(
        _net(), tr, va, FitConfig(epochs=6, **CFG), device="cpu", progress=False,
        distributed=False, out_dir=out, meta=META, resume=True,
        callbacks=[Scripted([1.0, 0.8, 0.9, 0.95, 0.97, 0.6]), stop],
    )  # fmt: skip
    assert len(hist) == 5 and stop.best == 0.8 and stop.stopped_epoch == 5


def test_resume_without_a_state_starts_from_scratch(tmp_path: Path) -> None:
    _, hist, _ = _run(tmp_path / "new", 2, resume=True)
    assert [r["epoch"] for r in hist] == [1, 2]


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"patience": 0}, "patience must be an integer >= 1, got 0"),
        ({"patience": True}, "patience must be an integer >= 1, got True"),
        ({"patience": 2, "mode": "median"}, "mode must be 'min' or 'max', got 'median'"),
        ({"patience": 2, "min_delta": -1.0}, "min_delta must be a number >= 0, got -1.0"),
    ],
)
def test_bad_early_stopping(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(TensorcutError) as e:
        EarlyStopping(**kw)
    assert str(e.value) == msg


def test_bad_callbacks_are_refused_before_training(tmp_path: Path) -> None:
    tr, va = _loaders()
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TensorcutError, match="needs meta= naming the architecture"):
        Checkpoint(tmp_path, {"model": "x"})
    with pytest.raises(TensorcutError, match="not JSON-serialisable"):
        check_checkpoint_meta({"model": {"name": "x", "kwargs": {"a": ...}}})
    cases: list[tuple[dict[str, Any], str]] = [
        ({"callbacks": [42]}, "callbacks take Callback objects or functions f(row, model)"),
        (
            {"callbacks": [Checkpoint(tmp_path / "a", META)], "out_dir": tmp_path / "b"},
            "give out_dir= or a Checkpoint callback, not both",
        ),
        ({"resume": True}, "--resume needs the output directory"),
    ]
    for kw, msg in cases:
        with pytest.raises(TensorcutError) as e:
            fit(net, tr, va, FitConfig(epochs=1, **CFG), device="cpu", progress=False,
                distributed=False, meta=META, **kw)  # fmt: skip
        assert msg in str(e.value)
    assert _same(net.state_dict(), before) and not any(tmp_path.iterdir())


def test_a_corrupt_state_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / TRAIN_STATE).write_bytes(b"not a zip file")
    with pytest.raises(TensorcutError, match="is corrupt or not a tensorcut training state"):
        _run(tmp_path, 2, resume=True)
    torch.save({"optimizer": {}, "epoch": 1, "history": "[]", "model": {"x": torch.ones(1)}},
               tmp_path / TRAIN_STATE)  # fmt: skip
    with pytest.raises(TensorcutError, match="does not fit this model and recipe"):
        _run(tmp_path, 2, resume=True)


# ---------------------------------------------------------------------------- several processes


def _stop_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 alone asks to stop after epoch 1; rank 0 alone writes the checkpoint."""
    join_as_rank(rank, world, port)

    class RankOneStops(Callback):
        def after_epoch(self, row: dict[str, Any], fit: FitState) -> None:
            fit.stop = fit.ctx.rank == 1

    try:
        tr, va = _loaders()
        hist = fit(
            _net(), tr, va, FitConfig(epochs=3, **CFG), device="cpu", progress=False,
            out_dir=Path(out) / "ck", meta=META, callbacks=[RankOneStops()],
        )  # fmt: skip
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(len(hist)))
    except BaseException:
        tdist.cleanup(together=False)
        raise
    tdist.cleanup()
    tdist.exit_process(0)  # past gloo's teardown race, as `python -m tensorcut` does


def test_one_rank_asking_to_stop_stops_every_rank(tmp_path: Path) -> None:
    assert spawn_ranks(_stop_worker, tmp_path) == [0, 0]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [1, 1]
    assert tio.read_meta(tmp_path / "ck")["epoch"] == 1
