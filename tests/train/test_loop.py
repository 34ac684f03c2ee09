"""The epoch loop (``train/loop.py``): learning, evaluation metrics, resume, early stopping,
distillation (FitConfig's validation: ``test_train_config.py``; the batch step:
``test_steps.py``)."""

import json

import pytest
import torch
from torch import nn

from tensorcut import data, models
from tensorcut.errors import TensorcutError
from tensorcut.train import FitConfig, evaluate, fit, resolve_device


def _loaders():
    tr = data.load_dataset("synthetic", "train", subset=320)
    va = data.load_dataset("synthetic", "val")
    return data.make_loader(tr, 32, shuffle=True), data.make_loader(va, 128)


def _net():
    torch.manual_seed(0)
    return models.create("vanilla-cnn", width=0.125, in_channels=3, input_size=16)


def test_evaluate_counts_topk_correctly():
    class Fixed(nn.Module):
        def forward(self, x):
            # class scores: 0 > 1 > 2 > ... for every input
            return torch.arange(10, 0, -1, dtype=torch.float32).expand(x.shape[0], 10)

    x = torch.zeros(6, 1, 4, 4)
    y = torch.tensor([0, 1, 4, 5, 9, 0])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    m = evaluate(Fixed(), loader)
    assert m["top1"] == pytest.approx(2 / 6) and m["top5"] == pytest.approx(4 / 6) and m["n"] == 6


def test_fit_learns_synthetic_task():
    tr, va = _loaders()
    net = _net()
    before = evaluate(net, va)["loss"]
    hist = fit(
        net, tr, va, FitConfig(epochs=2, lr=3e-3, scheduler="cosine"), device="cpu", progress=False
    )
    assert len(hist) == 2
    assert hist[-1]["val_loss"] < before and hist[-1]["val_top1"] > 0.5


def test_resume_continues_where_it_stopped(tmp_path):
    tr, va = _loaders()
    meta = {"model": {"name": "vanilla-cnn", "kwargs": {"width": 0.125, "input_size": 16}}}
    a = _net()
    fit(
        a,
        tr,
        va,
        FitConfig(epochs=2, lr=2e-3, scheduler="none"),
        device="cpu",
        out_dir=tmp_path,
        meta=meta,
        progress=False,
    )
    b = _net()
    hist = fit(
        b,
        tr,
        va,
        FitConfig(epochs=3, lr=2e-3, scheduler="none"),
        device="cpu",
        out_dir=tmp_path,
        meta=meta,
        resume=True,
        progress=False,
    )
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    saved = json.loads((tmp_path / "meta.json").read_text())
    assert saved["epoch"] == 3


def test_early_stopping_restores_best():
    tr, va = _loaders()
    net = _net()
    hist = fit(
        net,
        tr,
        va,
        FitConfig(epochs=30, lr=0.3, optimizer="sgd", scheduler="none", patience=1),
        device="cpu",
        progress=False,
    )
    assert len(hist) < 30
    best = min(h["val_loss"] for h in hist)
    assert evaluate(net, va)["loss"] == pytest.approx(best, rel=1e-4)


def test_distillation_runs_with_teacher_and_changes_loss():
    tr, va = _loaders()
    teacher = _net().eval()
    s1, s2 = _net(), _net()
    h1 = fit(s1, tr, None, FitConfig(epochs=1, scheduler="none"), device="cpu", progress=False)
    h2 = fit(
        s2,
        tr,
        None,
        FitConfig(epochs=1, scheduler="none", distill_alpha=0.5),
        device="cpu",
        teacher=teacher,
        progress=False,
    )
    assert h1[0]["train_loss"] != pytest.approx(h2[0]["train_loss"])


@pytest.mark.parametrize(
    "meta",
    [None, {}, {"model": "vanilla-cnn"}, {"model": {"kwargs": {}}}, {"model": {"name": ...}}],
)
def test_fit_with_out_dir_needs_meta_before_epoch_one(tmp_path, meta):
    tr, va = _loaders()
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(TensorcutError, match=r"needs meta= naming the architecture"):
        fit(net, tr, va, FitConfig(epochs=1), device="cpu", out_dir=tmp_path / "o", meta=meta)
    assert not (tmp_path / "o").exists()
    # no step was taken
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_fit_with_out_dir_refuses_meta_that_is_not_json_before_epoch_one(tmp_path):
    tr, va = _loaders()
    meta = {"model": {"name": "vanilla-cnn", "kwargs": {"width": ...}}}
    with pytest.raises(TensorcutError, match=r"fit\(meta=\.\.\.\) is not JSON-serialisable"):
        fit(_net(), tr, va, FitConfig(epochs=1), device="cpu", out_dir=tmp_path / "o", meta=meta)
    assert not (tmp_path / "o").exists()


def test_cuda_without_gpu_is_clear():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TensorcutError, match="no CUDA GPU is available"):
        resolve_device("cuda")


def test_unknown_device_is_refused_and_auto_is_cpu_here():
    with pytest.raises(TensorcutError) as e:
        resolve_device("tpu")
    assert str(e.value) == "unknown device 'tpu'; use auto, cpu or cuda"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_set_seed_makes_initial_weights_reproducible():
    from tensorcut.train import set_seed

    set_seed(7)
    a = nn.Linear(4, 3).weight.detach().clone()
    set_seed(7)
    assert torch.equal(nn.Linear(4, 3).weight, a)
