"""Activation cache: cached evaluation equals full evaluation exactly."""

from __future__ import annotations

import torch
from torch import nn

from tensorcut.study.cache import (
    BatchStore,
    EvalSet,
    LayerRunner,
    evaluate_full,
    swapped_weights,
)
from tensorcut.tenalg import truncate


class TinySeq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.conv3(x))
        return self.head(torch.flatten(x, 1))


class TinyRes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        identity = x
        out = self.relu(self.a(x))
        out = self.b(out)
        out += identity
        out = self.relu(out)
        return self.head(out.mean(dim=(2, 3)))


class Branchy(nn.Module):
    """Data-dependent control flow: not fx-traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean(dim=(2, 3))
        return y if y.sum() > 0 else -y


def _data(n: int = 50, bs: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 8, 8, generator=g)
    y = torch.randint(0, 7, (n,), generator=g)
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]


def _init(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    return model.eval()


def _check_exact(model: nn.Module, layer: str, budget: int = 1 << 30) -> LayerRunner:
    data = EvalSet(_data())
    runner = LayerRunner(model, layer, data, budget_bytes=budget)
    K = model.get_submodule(layer).weight.detach()
    for keep in (1, 2):
        with swapped_weights(model, {layer: truncate(K, "OUT", keep)}):
            fast, full = runner.evaluate(), evaluate_full(model, data)
        assert (fast.loss, fast.top1, fast.top5, fast.n) == (
            full.loss,
            full.top1,
            full.top5,
            full.n,
        )
    assert torch.equal(model.get_submodule(layer).weight, K)
    return runner


def test_cached_equals_uncached_sequential() -> None:
    model = _init(TinySeq())
    for layer in ("conv1", "conv2", "conv3"):
        runner = _check_exact(model, layer)
        assert runner.fast, runner.reason


def test_cached_logits_bitwise_equal() -> None:
    model = _init(TinySeq())
    data = EvalSet(_data())
    runner = LayerRunner(model, "conv2", data)
    split = runner._split
    assert split is not None
    with torch.inference_mode():
        for vals, (x, _) in zip(runner._store, data.batches(), strict=True):  # type: ignore[arg-type]
            assert torch.equal(split.suffix(*vals), model(x))


def test_cached_equals_uncached_residual_with_inplace() -> None:
    model = _init(TinyRes())
    for layer in ("a", "b", "stem"):
        runner = _check_exact(model, layer)
        assert runner.fast, runner.reason
    # the skip tensor is part of the cache for the layers inside the block
    assert len(LayerRunner(model, "a", EvalSet(_data()))._split.frontier) == 1  # type: ignore[union-attr]


def test_spill_to_disk_is_exact() -> None:
    model = _init(TinySeq())
    runner = _check_exact(model, "conv2", budget=4000)
    mem, disk = runner.cache_bytes
    assert disk > 0 and mem <= 4000
    runner.close()


def test_untraceable_model_falls_back_with_reason() -> None:
    model = _init(Branchy())
    runner = _check_exact(model, "conv")
    assert not runner.fast
    assert "not torch.fx-traceable" in runner.reason


def test_batch_store_order_and_cleanup() -> None:
    store = BatchStore(budget_bytes=100)
    items = [(torch.full((5,), float(i)),) for i in range(6)]
    for it in items:
        store.append(it)
    assert store.spilled and len(store) == 6
    assert all(torch.equal(a[0], b[0]) for a, b in zip(store, items, strict=True))
    d = store._dir
    store.close()
    assert d is not None and not __import__("os").path.exists(d)


def test_zoo_resnet_fast_path_exact() -> None:
    from tensorcut import models

    model = models.create("resnet20", num_classes=7, in_channels=2, width=0.25, input_size=8).eval()
    for layer in (
        "layer1.0.conv1",
        "layer2.0.conv2",
    ):  # inside residual blocks: skip tensors are cached too
        runner = _check_exact(model, layer)
        assert runner.fast, runner.reason
