"""TDLRT training (tensorcut.train.tdlrt): train_tdlrt = tuckerize + fit(step=TDLRTStep,
callbacks=[rank_callback]), its logging and progress, the CLI verb, checkpoints."""

from __future__ import annotations

import io
import math
import sys
from typing import Any

import pytest
import torch
from tdlrt_util import blobs, small_net
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.train import tdlrt
from tensorcut.train.tdlrt import is_tucker_layer, rank_report, train_tdlrt, tuckerize

pytestmark = pytest.mark.usefixtures("one_thread")


def test_io_save_load_after_tdlrt(tmp_path: Any) -> None:
    from tensorcut import models
    from tensorcut.checkpoint import io as tio

    torch.manual_seed(0)
    kw = {"num_classes": 3, "in_channels": 1, "width": 0.125, "input_size": 16}
    net = models.create("vanilla-cnn", **kw)
    x = torch.randn(16, 1, 16, 16)
    y = torch.randint(0, 3, (16,))
    hist = train_tdlrt(net, [(x, y)], [(x, y)], tau=0.2, epochs=2, lr=0.02, device="cpu")
    tio.save(
        net, tmp_path / "ck", {"model": {"name": "vanilla-cnn", "kwargs": kw}, "history": hist}
    )
    back = tio.load(tmp_path / "ck")
    assert torch.equal(back(x), net.eval()(x))


def test_train_tdlrt_logs_ranks_and_compression() -> None:
    torch.manual_seed(0)
    net = small_net()
    x, y = blobs(64)
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    rows: list[dict[str, Any]] = []
    hist = train_tdlrt(
        net,
        loader,
        loader,
        tau=0.3,
        init_rank=4,
        rmin=2,
        epochs=2,
        optimizer="adam",
        lr=0.01,
        scheduler="cosine",
        from_pretrained=False,
        device="cpu",
        log=rows.append,
    )
    assert hist == rows and len(hist) == 2
    row = hist[-1]
    assert set(row["ranks"]) == {"3", "6"}
    assert row["conv_dense_params"] > 0 and row["conv_cr"] == pytest.approx(
        row["conv_dense_params"] / row["conv_params"]
    )
    assert math.isfinite(row["val_loss"]) and 0 <= row["val_top1"] <= 1
    rep = rank_report(net)
    assert rep["layers"]["3"]["ranks"] == row["ranks"]["3"]


class _Terminal(io.StringIO):
    """A captured stream that says it is a terminal, so tqdm's ``disable=None`` shows the bar."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [True, False])
@pytest.mark.parametrize("progress", [True, False])
def test_train_tdlrt_shows_progress_like_fit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tty: bool, progress: bool
) -> None:
    """A bar per epoch on a terminal only (``disable=None``), one line per epoch; nothing when
    ``progress=False``."""
    torch.manual_seed(0)
    net = small_net()
    x, y = blobs(64)
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    capsys.readouterr()
    hist = train_tdlrt(
        net, loader, loader, tau=0.3, init_rank=4, epochs=2, lr=0.01, from_pretrained=False,
        device="cpu", progress=progress,
    )  # fmt: skip
    out = capsys.readouterr().out
    bar = err.getvalue()
    assert ("tdlrt epoch 1/2" in bar and "tdlrt epoch 2/2" in bar) == (progress and tty), bar
    assert ("\r" in bar) == (progress and tty)  # no carriage-return spam off a terminal
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    if progress:
        assert lines == [tdlrt.format_row(r) for r in hist]
        assert "conv compression" in lines[0] and "ranks " in lines[0]
    else:
        assert lines == []


def test_cli_train_method_tdlrt_from_scratch_and_from_checkpoint(
    tmp_path: Any, capsys: pytest.CaptureFixture
) -> None:
    from tensorcut.checkpoint import io as tio
    from tensorcut.cli import main

    common = [
        "--dataset",
        "digits",
        "--subset",
        "200",
        "--epochs",
        "1",
        "--width",
        "0.125",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--device",
        "cpu",
    ]
    assert main(["train", "--model", "vanilla-cnn", *common, "--out", str(tmp_path / "d")]) == 0
    assert (
        main(
            [
                "train",
                "--model",
                "vanilla-cnn",
                *common,
                "--method",
                "tdlrt",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "--tau" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--model",
                "vanilla-cnn",
                *common,
                "--method",
                "tdlrt",
                "--tau",
                "0.2",
                "--init-rank",
                "4",
                "--rmax",
                "6",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    ck = tio.load_checkpoint(tmp_path / "s")
    assert ck.meta["tdlrt"]["tau"] == 0.2 and ck.meta["recipe"]["method"] == "tdlrt"
    assert all(2 <= r <= 6 for rr in ck.meta["tdlrt"]["final_ranks"].values() for r in rr)
    assert (
        main(
            [
                "train",
                "--model",
                "vanilla-cnn",
                *common,
                "--method",
                "tdlrt",
                "--tau",
                "0.1",
                "--init-from",
                str(tmp_path / "d"),
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    back = tio.load(tmp_path / "p")
    assert any(is_tucker_layer(m) for m in back.modules())


def test_tdlrt_is_a_step_of_the_one_fit_loop() -> None:
    """``train_tdlrt`` is ``tuckerize`` + ``fit(step=TDLRTStep, callbacks=[rank_callback])``: the
    same seed gives bitwise the same history and weights, and the rows carry the ranks."""
    from tensorcut.train.loop import FitConfig, fit
    from tensorcut.train.tdlrt import TDLRTStep, rank_callback

    x, y = blobs(64)
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    torch.manual_seed(0)
    a = small_net()
    hist_a = train_tdlrt(
        a, loader, loader, tau=0.3, init_rank=4, epochs=2, lr=0.01, scheduler="none",
        from_pretrained=False, device="cpu", progress=False, distributed=False,
    )  # fmt: skip
    torch.manual_seed(0)
    b = tuckerize(small_net(), 4, from_pretrained=False)
    cfg = FitConfig(epochs=2, optimizer="sgd", lr=0.01, momentum=0.9, scheduler="none")
    hist_b = fit(
        b, loader, loader, cfg, device="cpu", progress=False, distributed=False,
        step=TDLRTStep(0.3), callbacks=[rank_callback],
    )  # fmt: skip
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in hist_a] == [
        {k: v for k, v in r.items() if k not in drop} for r in hist_b
    ]
    assert set(hist_b[0]) >= {"ranks", "conv_cr", "conv_compression_pct", "val_top1"}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tdlrt_step_refuses_what_it_cannot_train() -> None:
    from tensorcut.train.loop import FitConfig, fit
    from tensorcut.train.tdlrt import TDLRTStep

    x, y = blobs(32)
    net = tuckerize(small_net(), 4, from_pretrained=False)
    with pytest.raises(TensorcutError) as e:
        fit(net, [(x, y)], None, FitConfig(epochs=1, amp=True), device="cpu",
            progress=False, distributed=False, step=TDLRTStep(0.3))  # fmt: skip
    assert str(e.value) == "TDLRT trains in full precision; drop amp"


def test_fit_runs_a_custom_step_and_callbacks_in_order() -> None:
    """A user's step replaces backprop; callbacks see each row before it is recorded."""
    from tensorcut.train.loop import BackpropStep, FitConfig, fit

    calls: list[str] = []

    class Counting(BackpropStep):
        def __call__(self, net, x, y):  # type: ignore[no-untyped-def]
            calls.append("step")
            return super().__call__(net, x, y)

    def mark(row: dict[str, Any], model: nn.Module) -> None:
        calls.append(f"epoch {row['epoch']}")
        row["marked"] = True

    x, y = blobs(64)
    torch.manual_seed(0)
    hist = fit(
        small_net(), [(x[:32], y[:32]), (x[32:], y[32:])], None,
        FitConfig(epochs=2, scheduler="none"), device="cpu", progress=False, distributed=False,
        step=Counting(), callbacks=[mark],
    )  # fmt: skip
    assert calls == ["step", "step", "epoch 1", "step", "step", "epoch 2"]
    assert [r["marked"] for r in hist] == [True, True]


def test_default_recipe_is_sgd_at_twice_the_dense_rate_with_cosine() -> None:
    """Without a recipe train_tdlrt runs SGD from lr 0.1 on a cosine schedule (the rate at which
    TDLRT matched dense training in benchmarks/results/tdlrt.md; 0.05 left it a point under)."""
    torch.manual_seed(0)
    net = small_net()
    x, y = blobs(64)
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    hist = train_tdlrt(
        net, loader, None, tau=0.3, init_rank=4, epochs=2, from_pretrained=False, device="cpu",
        progress=False, distributed=False,
    )  # fmt: skip
    # lr of each epoch's last step on a 4-step cosine from 0.1: 0.1 (1 + cos(pi k / 4)) / 2
    expect = [0.1 * (1 + math.cos(math.pi * k / 4)) / 2 for k in (2, 4)]
    # the scheduler's recursive float64 update over 4 steps: a few roundings of 2^-53 each
    assert [h["lr"] for h in hist] == pytest.approx(expect, rel=64 * 2.0**-53, abs=0)


def test_tdlrt_recipe_matches_train_tdlrt_defaults_and_gives_adam_its_own_rate() -> None:
    import inspect

    sig = inspect.signature(train_tdlrt).parameters
    keys = ("optimizer", "lr", "momentum", "weight_decay", "scheduler")
    assert tdlrt.tdlrt_recipe() == {k: sig[k].default for k in keys}
    assert tdlrt.tdlrt_recipe(optimizer="adam")["lr"] == 3e-3
    assert tdlrt.tdlrt_recipe(optimizer="adam", lr=0.01)["lr"] == 0.01
    with pytest.raises(TensorcutError) as e:
        tdlrt.tdlrt_recipe(optimizer="rmsprop")  # type: ignore[arg-type]
    assert str(e.value) == "unknown base optimizer 'rmsprop'; choose one of: sgd, adam"


def test_checkpoint_verb_defaults_are_train_tdlrt_defaults() -> None:
    import inspect

    from tensorcut.train.tdlrt_verb import train_tdlrt_checkpoint

    verb = inspect.signature(train_tdlrt_checkpoint).parameters
    core = inspect.signature(train_tdlrt).parameters
    for k in ("optimizer", "lr", "momentum", "weight_decay", "scheduler"):
        assert verb[k].default == core[k].default, k
