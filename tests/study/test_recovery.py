"""Post-truncation recovery (``analysis/recovery.py``): the chosen truncation, epoch 0 as the
truncated model before retraining, the caller's model untouched, the progress bar rule."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from analysis_helpers import batches, tiny_cnn

from tensorcut.study.store import ResultsStore
from tensorcut.study.sweep import analyze
from tensorcut.tenalg import truncate


def _top1(model: torch.nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in data)
    return hits / sum(len(y) for _, y in data)


def test_epoch_zero_is_the_truncated_model_and_the_caller_model_is_untouched(tmp_path: Path):
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    val = batches()
    out = tmp_path / "r.sqlite"
    analyze(
        model,
        val,
        out,
        layers=["conv2", "conv3"],
        single_layer=False,
        recover_epochs=1,
        train_loader=batches(n=32, seed=3),
        recover_kwargs={"scenarios": ("OUT",), "fractions": (0.0,)},
        csv=False,
        progress=False,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with ResultsStore(out) as st:
        rows = st.rows(kind="recovery")
    assert [(r["method"], r["bipartition"], r["epoch"]) for r in rows] == [
        ("svd", "OUT", 0),
        ("svd", "OUT", 1),
    ]
    extra = rows[0]["extra"]
    assert extra["scenario"] == "OUT" and extra["truncation"] == {"conv2": 1, "conv3": 1}
    assert len(extra["probes"]) == 1 and isinstance(extra["near_chance_reached"], bool)
    # epoch 0: the model with both kernels cut to one singular value along OUT, not retrained
    cut = tiny_cnn()
    with torch.no_grad():
        for name in ("conv2", "conv3"):
            conv = cut.get_submodule(name)
            conv.weight.copy_(truncate(conv.weight, "OUT", 1))
    assert rows[0]["top1"] == pytest.approx(_top1(cut, val))
    assert extra["probes"][0]["top1"] == pytest.approx(_top1(cut, val))


class _Terminal(io.StringIO):
    """A captured stream that says it is a terminal, so tqdm's ``disable=None`` shows a bar."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_recovery_bar_only_on_a_terminal(monkeypatch, tty):
    """The recovery study's bar follows the package rule (``disable=None``): shown on a
    terminal, silent (no ``\\r`` lines) when stderr is a file or pipe."""
    from types import SimpleNamespace

    from tensorcut.study.recovery import run_recovery

    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    sweep = SimpleNamespace(
        model=tiny_cnn(), evalsets={"val": None}, progress=True, is_done=lambda k: True
    )
    sweep.key = lambda *a: a
    sweep.report = SimpleNamespace(skipped=0)
    run_recovery(sweep, ["conv2"], {}, [], 1, scenarios=["OUT-IN"])
    assert sweep.report.skipped == 2  # the scenario was visited (and found done)
    assert ("recovery" in err.getvalue()) == tty, err.getvalue()
