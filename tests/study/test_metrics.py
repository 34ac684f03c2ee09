"""Truncation metrics (``analysis/metrics.py``): the spectrum-only SVD metrics equal the ones
measured on the rebuilt kernel; CP and Tucker counts; averages over layers."""

from __future__ import annotations

import math

import pytest
import torch

from tensorcut.errors import TensorcutError
from tensorcut.study.metrics import (
    corr_loss_pct,
    cp_metrics,
    cp_truncate,
    mean_metrics,
    reconstruction_metrics,
    svd_metrics,
    tucker_metrics,
)
from tensorcut.tenalg import svd_bipartition, svd_factor_params


def _kernel(seed: int = 0, shape: tuple[int, ...] = (6, 4, 3, 3)) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bip,keep", [("OUT", 2), ("IN", 1), ("OUT-IN", 5), ("KW", 3)])
def test_svd_metrics_equal_the_measured_ones(bip: str, keep: int) -> None:
    K = _kernel()
    svd = svd_bipartition(K, bip)
    fast = svd_metrics(svd, keep)
    slow = reconstruction_metrics(
        K,
        svd.truncate(keep),
        svd_factor_params(K.shape, bip, keep),
        entropy_bipartition=bip,
    )
    for f in ("norm_loss_pct", "rel_error", "entropy_before", "entropy_after", "corr_loss_pct"):
        assert getattr(fast, f) == pytest.approx(getattr(slow, f), rel=1e-9, abs=1e-9), f
    assert fast.compression_ratio == slow.compression_ratio
    assert fast.rel_error == pytest.approx(math.sqrt(fast.norm_loss_pct / 100), rel=1e-12)


def test_keeping_everything_loses_nothing() -> None:
    K = _kernel()
    svd = svd_bipartition(K, "OUT")
    m = svd_metrics(svd, svd.n)
    assert m.norm_loss_pct == 0.0 and m.rel_error == 0.0 and m.corr_loss_pct == 0.0
    assert m.as_dict()["entropy_bipartition"] == "OUT" and m.dense_params == 6 * 4 * 9


def test_corr_loss_pct() -> None:
    assert corr_loss_pct(2.0, 1.0) == 50.0
    assert corr_loss_pct(0.0, 0.0) == 0.0  # a product kernel has no correlation to lose


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(TensorcutError) as e:
        reconstruction_metrics(_kernel(), _kernel()[:, :2], 10)
    assert str(e.value) == "approximation shape (6, 2, 3, 3) differs from kernel (6, 4, 3, 3)"


def test_cp_of_a_rank_one_kernel_is_exact_and_counts_its_factors() -> None:
    g = torch.Generator().manual_seed(1)
    a, b, c, d = (torch.randn(n, dtype=torch.float64, generator=g) for n in (6, 4, 3, 3))
    K = torch.einsum("o,i,h,w->oihw", a, b, c, d)
    cp = cp_truncate(K, 1)
    assert cp.rank == 1 and cp.rel_error < 1e-8 and cp.kernel.dtype == K.dtype
    m = cp_metrics(K, cp)
    assert m.rel_error < 1e-8 and abs(m.norm_loss_pct) < 1e-6
    assert m.factor_params == 6 + 4 + 3 + 3 and m.compression_ratio == 216 / 16
    for bad in (0, 1.5, True):
        with pytest.raises(TensorcutError) as e:
            cp_truncate(K, bad)  # type: ignore[arg-type]
        assert str(e.value) == f"CP rank must be a positive integer, got {bad!r}"


def test_tucker_metrics_count_core_and_factors() -> None:
    K = _kernel()
    m = tucker_metrics(K, K.clone(), (2, 2, 3, 3))
    assert m.factor_params == 2 * 2 * 3 * 3 + 6 * 2 + 4 * 2 + 3 * 3 + 3 * 3
    assert m.rel_error == 0.0 and m.norm_loss_pct == 0.0


def test_mean_metrics_average_losses_and_pool_the_counts() -> None:
    a = svd_metrics(svd_bipartition(_kernel(0), "OUT"), 1)
    b = svd_metrics(svd_bipartition(_kernel(1, (8, 6, 3, 3)), "OUT"), 3)
    m = mean_metrics({"a": a, "b": b}, "vn")
    assert m["norm_loss_pct"] == pytest.approx((a.norm_loss_pct + b.norm_loss_pct) / 2)
    assert m["compression_ratio"] == (a.dense_params + b.dense_params) / (
        a.factor_params + b.factor_params
    )
    assert m["entropy_form"] == "vn"
