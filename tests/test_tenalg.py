"""Kernel math: unfold / fold, SVD truncation, entropy, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from tensorcut.errors import TensorcutError
from tensorcut.study.metrics import corr_loss_pct, reconstruction_metrics, svd_metrics
from tensorcut.tenalg import (
    BIPARTITIONS,
    canonical_bipartition,
    entropy,
    fold,
    n_singular,
    spectrum,
    svd_bipartition,
    truncate,
    unfold,
    unfold_shape,
)

SHAPE = (6, 5, 3, 2)


def _kernel(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("bip", BIPARTITIONS)
def test_unfold_fold_round_trip(bip: str) -> None:
    K = _kernel()
    M = unfold(K, bip)
    assert tuple(M.shape) == unfold_shape(SHAPE, bip)
    assert torch.equal(fold(M, bip, SHAPE), K)


def test_unfold_layout_matches_definition() -> None:
    K = _kernel()
    # rows = named modes in kernel order, columns = the others in kernel order
    assert torch.equal(unfold(K, "OUT"), K.reshape(6, -1))
    assert torch.equal(unfold(K, "KW"), K.permute(3, 0, 1, 2).reshape(2, -1))
    assert torch.equal(unfold(K, "OUT-KH"), K.permute(0, 2, 1, 3).reshape(18, 10))
    assert unfold(K, "OUT-IN")[7, 4].item() == K[1, 2, 2, 0].item()  # row o*IN+i, column h*KW+w


def test_bipartition_names() -> None:
    assert canonical_bipartition("in-kw") == "OUT-KH"
    assert canonical_bipartition("KH,KW") == "OUT-IN"
    assert canonical_bipartition("in,kh,kw") == "OUT"
    with pytest.raises(TensorcutError) as e:
        canonical_bipartition("OUT-XY")
    assert str(e.value) == (
        "unknown bipartition 'OUT-XY'; valid: OUT, IN, KH, KW, OUT-IN, OUT-KH, OUT-KW"
    )
    with pytest.raises(TensorcutError):
        canonical_bipartition("OUT-IN-KH-KW")


@pytest.mark.parametrize("bip", BIPARTITIONS)
def test_keep_n_returns_original_exactly(bip: str) -> None:
    K = _kernel(1)
    n = n_singular(SHAPE, bip)
    assert torch.equal(truncate(K, bip, n), K)
    m = svd_metrics(svd_bipartition(K, bip), n)
    assert m.norm_loss_pct == 0.0 and m.rel_error == 0.0 and m.corr_loss_pct == 0.0


@pytest.mark.parametrize("bip", BIPARTITIONS)
def test_norm_loss_is_discarded_squared_singular_values(bip: str) -> None:
    K = _kernel(2).double()
    svd = svd_bipartition(K, bip)
    S = spectrum(K, bip)
    for k in range(1, svd.n + 1):
        m = svd_metrics(svd, k)
        expect = 100.0 * float((S[k:] ** 2).sum() / (S**2).sum())
        assert m.norm_loss_pct == pytest.approx(expect, abs=1e-12)
        Kt = svd.truncate(k)
        measured = 100.0 * (float((K**2).sum()) - float((Kt**2).sum())) / float((K**2).sum())
        assert measured == pytest.approx(expect, abs=1e-9)
        assert m.rel_error == pytest.approx(
            float(torch.linalg.vector_norm(K - Kt) / torch.linalg.vector_norm(K)), abs=1e-9
        )
        assert m.rel_error == pytest.approx(math.sqrt(m.norm_loss_pct / 100.0), abs=1e-12)
        r, c = unfold_shape(SHAPE, bip)
        assert m.compression_ratio == pytest.approx(math.prod(SHAPE) / (k * (r + c)))
        # the truncated kernel has rank k along this cut
        assert int(torch.linalg.matrix_rank(unfold(Kt, bip))) == k


def test_entropy_product_kernel_is_exactly_zero() -> None:
    g = torch.Generator().manual_seed(3)
    vecs = [torch.randn(n, generator=g) for n in SHAPE]
    K = torch.einsum("a,b,c,d->abcd", *vecs)
    for bip in BIPARTITIONS:
        for form in ("vn", "literal"):
            svd = svd_bipartition(K, bip)
            assert entropy(svd.S, form, tol=svd.rank_tol) == 0.0
            assert svd_metrics(svd, 1, entropy_form=form).entropy_before == 0.0


def test_entropy_values() -> None:
    S = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert entropy(S) == pytest.approx(math.log(4))
    # literal Eq. 14: s = 1/2 each -> -4 * 0.5 ln 0.5 = 2 ln 2
    assert entropy(S, "literal") == pytest.approx(2 * math.log(2))
    with pytest.raises(TensorcutError):
        entropy(S, "shannon")


def test_correlation_loss() -> None:
    K = _kernel(4)
    svd = svd_bipartition(K, "OUT")
    m = svd_metrics(svd, 2)
    assert m.entropy_after == pytest.approx(entropy(svd.S[:2]))
    assert m.corr_loss_pct == pytest.approx(
        100 * (m.entropy_before - m.entropy_after) / m.entropy_before
    )
    assert corr_loss_pct(0.0, 0.0) == 0.0


def test_keep_out_of_range_message() -> None:
    svd = svd_bipartition(_kernel(), "KW")
    with pytest.raises(TensorcutError) as e:
        svd.truncate(3, layer="conv2")
    assert (
        str(e.value)
        == "keep=3 out of range for layer 'conv2' along KW (kernel (6, 5, 3, 2)): valid 1..2"
    )
    with pytest.raises(TensorcutError):
        svd.truncate(0)


def test_reconstruction_metrics_match_svd_metrics() -> None:
    K = _kernel(5).double()
    svd = svd_bipartition(K, "OUT")
    Kt = svd.truncate(3)
    direct = reconstruction_metrics(K, Kt, 3 * (6 + 30), entropy_bipartition="OUT")
    spec = svd_metrics(svd, 3)
    assert direct.norm_loss_pct == pytest.approx(spec.norm_loss_pct, abs=1e-9)
    assert direct.rel_error == pytest.approx(spec.rel_error, abs=1e-9)
    assert direct.entropy_after == pytest.approx(spec.entropy_after, abs=1e-9)
    assert direct.compression_ratio == pytest.approx(spec.compression_ratio)


def test_tucker_truncate_full_and_reduced() -> None:
    from tensorcut.study.metrics import tucker_metrics
    from tensorcut.tenalg import tucker_truncate

    K = _kernel(6).double()
    assert torch.equal(tucker_truncate(K, SHAPE), K)
    Kt = tucker_truncate(K, (3, 3, 2, 2))
    m = tucker_metrics(K, Kt, (3, 3, 2, 2))
    assert m.compression_ratio == pytest.approx(
        math.prod(SHAPE) / (3 * 3 * 2 * 2 + 6 * 3 + 5 * 3 + 3 * 2 + 2 * 2)
    )
    assert 0 < m.norm_loss_pct < 100
    assert m.rel_error == pytest.approx(
        math.sqrt(m.norm_loss_pct / 100), rel=1e-6
    )  # HOSVD: orthogonal projection
    with pytest.raises(TensorcutError) as e:
        tucker_truncate(K, (7, 1, 1, 1))
    assert str(e.value) == "Tucker rank 7 for mode OUT out of range: valid 1..6"
