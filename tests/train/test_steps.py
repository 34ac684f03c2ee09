"""What ``fit`` does with one batch (``train/steps.py``): the recipe's optimiser, plain
backpropagation with gradient clipping and distillation, the step's resumable state, and the
epoch's console line."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tensorcut import distributed as tdist
from tensorcut.train.config import FitConfig
from tensorcut.train.steps import BackpropStep, TrainStep, format_row, make_optimizer

CPU = torch.device("cpu")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _step(net: nn.Module, cfg: FitConfig, teacher: nn.Module | None = None) -> BackpropStep:
    step = BackpropStep()
    step.setup(net, cfg, tdist.DistContext(device=CPU), CPU, teacher)
    return step


def test_make_optimizer_follows_the_recipe_and_skips_frozen_parameters():
    net = _net()
    net[0].weight.requires_grad_(False)
    adam = make_optimizer(net, FitConfig(lr=3e-3, weight_decay=1e-4))
    assert isinstance(adam, torch.optim.Adam)
    assert adam.defaults["lr"] == 3e-3 and adam.defaults["weight_decay"] == 1e-4
    assert sum(p.numel() for g in adam.param_groups for p in g["params"]) == (
        sum(p.numel() for p in net.parameters()) - net[0].weight.numel()
    )
    sgd = make_optimizer(net, FitConfig(optimizer="sgd", lr=0.1, momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] is True
    plain = make_optimizer(net, FitConfig(optimizer="sgd", lr=0.1, momentum=0.0))
    assert plain.defaults["nesterov"] is False  # Nesterov needs a momentum


def test_backprop_step_lowers_the_loss_on_its_batch():
    net, (x, y) = _net(), _batch()
    step = _step(net, FitConfig(optimizer="sgd", lr=0.5, momentum=0.0))
    first, logits = step(net, x, y)
    assert logits.shape == (16, 3)
    for _ in range(20):
        last, _ = step(net, x, y)
    assert last.item() < first.item()


def test_gradient_clipping_bounds_the_update():
    """With plain SGD at lr 1 an update is the (clipped) gradient: its norm is at most grad_clip;
    grad_clip 0 does not clip."""
    x, y = _batch()

    def update_norm(clip: float) -> float:
        net = _net()
        before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
        step = _step(net, FitConfig(optimizer="sgd", lr=1.0, momentum=0.0, grad_clip=clip))
        step(net, x, y)
        after = torch.cat([p.detach().flatten() for p in net.parameters()])
        return float((after - before).norm())

    assert update_norm(1e-3) == pytest.approx(1e-3, rel=1e-3)
    assert update_norm(0.0) > 1e-2


def test_distillation_from_an_identical_teacher_has_no_loss_at_alpha_one():
    """At distill_alpha 1 the loss is the teacher's KL term alone: zero for a copy of the net."""
    net, (x, y) = _net(), _batch()
    teacher = copy.deepcopy(net).eval()
    step = _step(net, FitConfig(distill_alpha=1.0), teacher)
    loss, _ = step(net, x, y)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    plain, _ = _step(_net(), FitConfig())(_net(), x, y)
    assert plain.item() > 0.5  # cross-entropy of an untrained 3-way classifier


def test_state_dict_round_trips_the_optimiser():
    net, (x, y) = _net(), _batch()
    step = _step(net, FitConfig())
    step(net, x, y)
    other = _step(copy.deepcopy(net), FitConfig())
    other.load_state_dict(step.state_dict())
    a, b = step.state_dict()["state"], other.state_dict()["state"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_a_step_must_define_its_update():
    class Half(TrainStep):
        pass

    net, (x, y) = _net(), _batch()
    with pytest.raises(NotImplementedError):
        Half().setup(net, FitConfig(), tdist.DistContext(device=CPU), CPU, None)
    with pytest.raises(NotImplementedError):
        Half()(net, x, y)
    assert BackpropStep.syncs_ranks is False and BackpropStep.label == ""


def test_format_row_shows_validation_when_measured(capsys):
    row = {"epoch": 2, "train_loss": 0.25, "train_top1": 0.9, "seconds": 1.25}
    assert format_row(row) == "epoch 2: train loss 0.2500 top1 0.9000 | 1.2s"
    row.update(val_loss=0.5, val_top1=0.75)
    assert format_row(row) == (
        "epoch 2: train loss 0.2500 top1 0.9000 | val loss 0.5000 top1 0.7500 | 1.2s"
    )
    BackpropStep().report(row)
    assert "val loss 0.5000" in capsys.readouterr().out
