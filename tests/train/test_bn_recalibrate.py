"""BatchNorm re-estimation after compression (`tensorcut.train.recalibrate_bn`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorcut.checkpoint import io as tio
from tensorcut.compression import CompressConfig
from tensorcut.errors import TensorcutError
from tensorcut.train import recalibrate_bn


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=0.3),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(8, 4, 1),
        nn.BatchNorm2d(4),
    )


def test_statistics_are_the_exact_average_over_the_batches():
    net = _net().train()
    data = [(torch.randn(16, 3, 6, 6) * 2 + 1, torch.zeros(16, dtype=torch.long)) for _ in range(3)]
    params = {k: v.clone() for k, v in net.named_parameters()}
    assert recalibrate_bn(net, data) == 2
    with torch.no_grad():
        pre = torch.cat([net[0](x) for x, _ in data])  # activations the first BatchNorm sees
    torch.testing.assert_close(net[1].running_mean, pre.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    # unbiased per-batch variances, averaged (equal batch sizes)
    var = torch.stack([net[0](x).detach().var(dim=(0, 2, 3), unbiased=True) for x, _ in data]).mean(
        0
    )
    torch.testing.assert_close(net[1].running_var, var, atol=1e-4, rtol=1e-4)
    assert net[1].momentum == 0.3 and net[5].momentum == 0.1  # restored
    assert net.training and all(m.training for m in net.modules())  # mode restored
    assert all(torch.equal(v, params[k]) for k, v in net.named_parameters())  # no parameter changed


def test_dropout_is_off_and_max_batches_bounds_the_pass():
    net = _net().eval()
    x = torch.randn(8, 3, 6, 6)
    recalibrate_bn(net, [(x, None)], max_batches=1)
    a = net[1].running_mean.clone()
    recalibrate_bn(net, [(x, None), (x * 5, None)], max_batches=1)  # the second batch is never read
    torch.testing.assert_close(net[1].running_mean, a)
    assert not net.training


def test_no_batchnorm_and_empty_data():
    assert recalibrate_bn(nn.Sequential(nn.Conv2d(1, 2, 3)), []) == 0
    with pytest.raises(
        TensorcutError, match="BatchNorm recalibration got no batches; give a non-empty data set"
    ):
        recalibrate_bn(_net(), [])


def test_compress_checkpoint_recalibrates_and_records_it(tmp_path):
    from tensorcut.pipeline.workflow import compress_checkpoint
    from tensorcut.train.api import train_checkpoint
    from tensorcut.train.config import FitConfig

    dense = tmp_path / "dense"
    train_checkpoint(
        "resnet20",
        "digits",
        dense,
        epochs=1,
        width=0.25,
        batch_size=64,
        config=FitConfig(epochs=1, lr=2e-3),
        subset=192,
        device="cpu",
        progress=False,
    )
    cfg = CompressConfig(method="tucker2", ratio=0.3)
    m0, _, meta0 = compress_checkpoint(dense, tmp_path / "plain", cfg, progress=False)
    m1, _, meta1 = compress_checkpoint(dense, tmp_path / "bn", cfg, progress=False, bn_images=64)
    assert "bn_recalibration" not in meta0
    assert (
        meta1["bn_recalibration"]["images"] == 64
        and meta1["bn_recalibration"]["batchnorm_layers"] > 0
    )
    bn0 = dict(m0.named_buffers())
    changed = [
        k
        for k, v in m1.named_buffers()
        if k.endswith("running_mean") and not torch.equal(v, bn0[k])
    ]
    assert changed  # statistics were re-estimated
    assert tio.load_checkpoint(tmp_path / "bn").meta["bn_recalibration"]["images"] == 64
    with pytest.raises(TensorcutError, match="--bn-images must be >= 0, got -1"):
        compress_checkpoint(dense, tmp_path / "x", cfg, progress=False, bn_images=-1)
