"""TDLRT: the rank-adaptive Tucker integrator (tensorcut.train.tdlrt)."""

from __future__ import annotations

import io
import math
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.layers.base import ConvGeometry, FactorizedConv2d, explicit_pad
from tensorcut.train import tdlrt
from tensorcut.train.tdlrt import TDLRTOptimizer, rank_report, train_tdlrt, tuckerize
from tensorcut.train.tdlrt_ops import augment_basis, orthonormality_error, truncation_rank

try:
    from tensorcut.layers.tucker import TuckerConv2d as _Tucker

    REAL_LAYER = True
except ImportError:  # the layer module is written in parallel; test against its contract meanwhile
    REAL_LAYER = False

    class _Tucker(FactorizedConv2d):  # type: ignore[no-redef]
        """Stand-in with the TuckerConv2d contract: first (U_in^T), core (C), last (U_out, bias)."""

        method = "tucker2"

        def __init__(self, geometry: ConvGeometry, ranks: tuple[int, int]) -> None:
            super().__init__()
            self.geometry = geometry
            r_out, r_in = ranks
            self.first = nn.Conv2d(geometry.in_channels, r_in, 1, bias=False)
            self.core = nn.Conv2d(
                r_in,
                r_out,
                geometry.kernel_size,
                stride=geometry.stride,
                dilation=geometry.dilation,
                bias=False,
            )
            self.last = nn.Conv2d(r_out, geometry.out_channels, 1, bias=geometry.bias)

        @property
        def ranks(self) -> tuple[int, ...]:
            return (int(self.core.weight.shape[0]), int(self.core.weight.shape[1]))

        def reconstruct_weight(self) -> torch.Tensor:
            return torch.einsum(
                "oa,abhw,ib->oihw",
                self.last.weight[:, :, 0, 0],
                self.core.weight,
                self.first.weight[:, :, 0, 0],
            )

        @classmethod
        def from_config(cls, cfg: dict[str, Any]) -> _Tucker:
            return cls(ConvGeometry.from_dict(cfg["geometry"]), tuple(cfg["ranks"]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.last(self.core(explicit_pad(self.first(x), self.geometry)))


@pytest.fixture(autouse=True)
def _layer_class(monkeypatch: pytest.MonkeyPatch) -> Any:
    if not REAL_LAYER:
        monkeypatch.setattr(tdlrt, "_tucker_class", lambda: _Tucker)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these problems are tiny: one thread is fastest on a shared machine
    yield
    torch.set_num_threads(threads)


def _kernel(layer: nn.Module) -> torch.Tensor:
    U_out, C, U_in = tdlrt._factors(layer)
    return torch.einsum("oa,abhw,ib->oihw", U_out, C, U_in)


def _conv_ref(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    g = layer.geometry
    bias = layer.last.bias
    return F.conv2d(explicit_pad(x, g), _kernel(layer), bias, stride=g.stride, dilation=g.dilation)


def _net(c: int = 6, width: int = 12, classes: int = 3, bn: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1)]
    layers += [nn.BatchNorm2d(width)] if bn else []
    layers += [nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False)]
    layers += [nn.BatchNorm2d(width)] if bn else []
    layers += [
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    ]
    return nn.Sequential(*layers)


def _blobs(
    n: int = 96, c: int = 6, hw: int = 6, classes: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, c, hw, hw, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = protos[y] + 0.8 * torch.randn(n, c, hw, hw, generator=g)
    return x, y


def _check_invariants(opt: TDLRTOptimizer, rmin: int, rmax: int | None) -> None:
    for name, layer in opt.layers.items():
        U_out, C, U_in = tdlrt._factors(layer)
        for U in (U_out, U_in):
            assert orthonormality_error(U) < 1e-5, name
            n, r = U.shape
            hi = n if rmax is None else min(rmax, n)
            assert min(rmin, hi) <= r <= hi, (name, r)
        assert C.shape[:2] == (U_out.shape[1], U_in.shape[1])


# ---------------------------------------------------------------------------- building blocks


def test_augment_basis_keeps_old_basis_and_is_orthonormal() -> None:
    torch.manual_seed(0)
    U = torch.linalg.qr(torch.randn(10, 3)).Q
    for D, r_aug in (
        (torch.randn(10, 3), 6),
        (torch.randn(10, 3), 5),
        (torch.zeros(10, 3), 6),
        (U @ torch.randn(3, 3), 6),
    ):
        Q = augment_basis(U, D, r_aug)
        assert Q.shape == (10, r_aug)
        assert orthonormality_error(Q) < 1e-5
        assert torch.allclose(Q[:, :3], U, atol=1e-5)
    D = torch.randn(10, 3)  # the new directions span D's part orthogonal to U
    Q = augment_basis(U, D, 6)
    Dp = D - U @ (U.T @ D)
    assert torch.allclose(Q @ (Q.T @ Dp), Dp, atol=1e-5)


def test_truncation_rank_rule() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 0.1, 0.01])
    norm = float(s.norm())
    assert truncation_rank(s, 0.0, 1, 5) == 5  # tau = 0: nothing dropped
    assert truncation_rank(s, 0.2 * norm, 1, 5) == 3  # ||[0.1, 0.01]|| = 0.1005 < 0.2 * 4.58
    assert truncation_rank(s, 0.99 * norm, 2, 5) == 2  # rmin wins
    assert truncation_rank(s, 0.0, 1, 4) == 4  # rmax wins


# ---------------------------------------------------------------------------- conversion


def test_tuckerize_pretrained_full_rank_is_exact_and_skips_first() -> None:
    torch.manual_seed(0)
    net = _net(bn=False).eval()
    x = torch.randn(4, 6, 6, 6)
    ref = net(x)
    tuckerize(net)
    assert isinstance(net[0], nn.Conv2d) and not tdlrt.is_tucker_layer(net[0])
    assert tdlrt.is_tucker_layer(net[2]) and tdlrt.is_tucker_layer(net[4])
    assert torch.allclose(net(x), ref, atol=1e-5)
    for layer in (net[2], net[4]):
        xin = torch.randn(2, layer.geometry.in_channels, 7, 7)
        assert torch.allclose(layer(xin), _conv_ref(layer, xin), atol=1e-5)


def test_tuckerize_scratch_ranks_filter_and_existing_layers() -> None:
    torch.manual_seed(0)
    net = _net()
    tuckerize(
        net, from_pretrained=False, rmin=2, rmax=5, filter=lambda name, conv: conv.stride == (1, 1)
    )
    assert tdlrt.is_tucker_layer(net[3]) and isinstance(
        net[6], nn.Conv2d
    )  # stride-2 conv filtered out
    assert net[3].core.weight.shape[:2] == (5, 5)  # ceil(12/2) = 6, capped at rmax = 5
    assert orthonormality_error(tdlrt._factors(net[3])[0]) < 1e-5
    # an existing Tucker layer with non-orthonormal factors is normalised exactly, then truncated
    layer = net[3]
    with torch.no_grad():
        layer.last.weight.mul_(3.0)
        layer.first.weight.add_(0.1)
    x = torch.randn(2, 12, 6, 6)
    before = layer(x)
    tuckerize(net, rmin=2, rmax=5)
    assert orthonormality_error(tdlrt._factors(layer)[0]) < 1e-5
    assert orthonormality_error(tdlrt._factors(layer)[2]) < 1e-5
    assert torch.allclose(layer(x), before, atol=1e-4)
    tuckerize(net, init_rank=3, rmin=2)
    assert layer.core.weight.shape[:2] == (3, 3)
    other = tuckerize(
        _net(), init_rank={"3": (4, 2), "6": 5}, rmin=1
    )  # per-layer ranks, e.g. another run's
    assert other[3].core.weight.shape[:2] == (4, 2) and other[6].core.weight.shape[:2] == (5, 5)


def test_bad_input_is_reported() -> None:
    with pytest.raises(TensorcutError, match="no Tucker layers"):
        TDLRTOptimizer(_net(), 0.1)
    net = tuckerize(_net())
    for kwargs in (
        {"tau": -0.1},
        {"tau": 1.5},
        {"tau": 0.1, "rmin": 0},
        {"tau": 0.1, "rmin": 4, "rmax": 3},
        {"tau": 0.1, "base": "lbfgs"},
    ):
        with pytest.raises(TensorcutError):
            TDLRTOptimizer(net, **kwargs)
    opt = TDLRTOptimizer(net, 0.1)
    with pytest.raises(TensorcutError, match="closure"):
        opt.step(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the integrator


@pytest.mark.parametrize(
    ("base", "tau"), [("sgd", 0.0), ("adam", 0.0), ("sgd", 0.6), ("adam", 0.6)]
)
def test_invariants_hold_after_every_step(base: str, tau: float) -> None:
    torch.manual_seed(1)
    net = tuckerize(_net(), from_pretrained=False, init_rank=3, rmin=2, rmax=7)
    x, y = _blobs()
    opt = TDLRTOptimizer(net, tau, rmin=2, rmax=7, base=base, lr=0.05 if base == "sgd" else 0.01)
    seen = set()
    for i in range(12):
        xb, yb = x[i % 3 * 32 : (i % 3 + 1) * 32], y[i % 3 * 32 : (i % 3 + 1) * 32]
        opt.step(lambda xb=xb, yb=yb: _ce_backward(net, xb, yb))
        _check_invariants(opt, 2, 7)
        for layer in opt.layers.values():  # the core's optimiser state follows its shape
            st = opt.base.state.get(layer.core.weight, {})
            for k in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if k in st:
                    assert st[k].shape == layer.core.weight.shape
        seen |= {r for rr in opt.ranks().values() for r in rr}
        layer = next(iter(opt.layers.values()))
        xin = torch.randn(2, layer.geometry.in_channels, 6, 6)
        assert torch.allclose(layer(xin), _conv_ref(layer, xin), atol=1e-5)
    final = {r for rr in opt.ranks().values() for r in rr}
    if tau == 0:
        assert final == {7} and 6 in seen  # tau = 0 truncates nothing: 3 -> 6 -> rmax
    else:
        assert min(seen) == 2  # a large tau prunes down to rmin


def _ce_backward(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss


def _single_layer_problem(
    r: int, n: int = 6, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(n, n, 3, padding=1)
    layer = tdlrt._build_layer(
        conv,
        torch.linalg.qr(torch.randn(n, r)).Q,
        torch.randn(r, r, 3, 3) * 0.3,
        torch.linalg.qr(torch.randn(n, r)).Q,
    )
    x = torch.randn(8, n, 5, 5)
    target = torch.randn(8, n, 5, 5)
    return layer, x, target


def _dense_loss_and_grad(
    layer: nn.Module, W: torch.Tensor, x: torch.Tensor, t: torch.Tensor
) -> tuple[float, torch.Tensor]:
    W = W.detach().clone().requires_grad_(True)
    out = F.conv2d(explicit_pad(x, layer.geometry), W, layer.last.bias.detach())
    loss = 0.5 * (out - t).pow(2).mean()
    loss.backward()
    return float(loss.detach()), W.grad


@pytest.mark.parametrize("r", [3, 2])
def test_tau0_step_is_a_projected_gradient_step(r: int) -> None:
    """tau = 0: the step moves the kernel by -lr * (grad projected on the augmented bases).

    r = 3 of n = 6: the augmented bases are complete, so this *is* the dense gradient step and
    the loss decrease matches the dense step's; r = 2: a Galerkin projection, and the decrease
    matches lr * ||projected grad||^2 to first order.
    """
    layer, x, t = _single_layer_problem(r)
    model = nn.Sequential(layer)
    lr = 1e-3
    opt = TDLRTOptimizer(model, 0.0, rmin=1, base="sgd", lr=lr, momentum=0.0)
    W0 = _kernel(layer).clone()
    L0, G = _dense_loss_and_grad(layer, W0, x, t)

    def closure() -> torch.Tensor:
        loss = 0.5 * (model(x) - t).pow(2).mean()
        loss.backward()
        return loss

    assert abs(float(opt.step(closure)) - L0) < 1e-6
    W1 = _kernel(layer)
    U_out, _, U_in = tdlrt._factors(layer)
    assert U_out.shape[1] == min(2 * r, 6) and U_in.shape[1] == min(2 * r, 6)  # no truncation
    Po, Pi = U_out @ U_out.T, U_in @ U_in.T  # span of the augmented bases (tau = 0 keeps it)
    PG = torch.einsum("po,oihw,iq->pqhw", Po, G, Pi)
    assert torch.allclose(W1, W0 - lr * PG, atol=1e-6)
    L1 = _dense_loss_and_grad(layer, W1, x, t)[0]
    pred = lr * float(PG.pow(2).sum())  # first-order decrease of the projected step
    assert pred > 0
    assert abs((L0 - L1) / pred - 1) < 0.05
    if r == 3:
        assert torch.allclose(PG, G, atol=1e-6)
        L1_dense = _dense_loss_and_grad(layer, W0 - lr * G, x, t)[0]
        assert abs((L0 - L1) - (L0 - L1_dense)) < 1e-3 * (L0 - L1_dense) + 1e-7


def test_projected_step_contains_the_tangent_direction() -> None:
    """The augmented space holds the Tucker tangent-space gradient (the paper's descent bound)."""
    layer, x, t = _single_layer_problem(2, n=8, seed=3)
    U_out0, C0, U_in0 = (a.clone() for a in tdlrt._factors(layer))
    _, G = _dense_loss_and_grad(layer, _kernel(layer), x, t)
    opt = TDLRTOptimizer(nn.Sequential(layer), 0.0, rmin=1, lr=1e-4, momentum=0.0)
    opt.step(lambda: _mse_backward(layer, x, t))
    U_out, _, U_in = tdlrt._factors(layer)
    Po, Pi = U_out @ U_out.T, U_in @ U_in.T
    # tangent space at C0 x U_out0 x U_in0: core variations plus factor variations orthogonal to U
    Qo, Qi = U_out0 @ U_out0.T, U_in0 @ U_in0.T
    core_part = torch.einsum("po,oihw,iq->pqhw", Qo, G, Qi)
    Go = torch.einsum("oihw,ib,abhw->oa", G, U_in0, C0)  # dL/dU_out
    Gi = torch.einsum("oihw,oa,abhw->ib", G, U_out0, C0)  # dL/dU_in
    out_part = torch.einsum(
        "oa,abhw,ib->oihw", (torch.eye(8) - Qo) @ Go @ torch.linalg.pinv(_gram(C0, 0)), C0, U_in0
    )
    in_part = torch.einsum(
        "oa,abhw,ib->oihw", U_out0, C0, (torch.eye(8) - Qi) @ Gi @ torch.linalg.pinv(_gram(C0, 1))
    )
    for part in (core_part, out_part, in_part):
        projected = torch.einsum("po,oihw,iq->pqhw", Po, part, Pi)
        assert torch.allclose(projected, part, atol=1e-5)


def _gram(C: torch.Tensor, mode: int) -> torch.Tensor:
    M = torch.movedim(C, mode, 0).reshape(C.shape[mode], -1)
    return M @ M.T


def _mse_backward(layer: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    loss = 0.5 * (layer(x) - t).pow(2).mean()
    loss.backward()
    return loss


def test_second_pass_does_not_double_count_batchnorm() -> None:
    torch.manual_seed(0)
    net = tuckerize(_net(), rmax=6)
    ref = tuckerize(_net(), rmax=6)
    ref.load_state_dict(net.state_dict())
    x, y = _blobs(32)
    opt = TDLRTOptimizer(net, 0.1, rmax=6)
    opt.step(lambda: _ce_backward(net, x, y))
    ref.train()
    with torch.no_grad():
        ref(x)
    assert torch.allclose(net[1].running_mean, ref[1].running_mean, atol=1e-6)
    assert int(net[1].num_batches_tracked) == 1


def test_loss_decreases_on_synthetic_task_and_ranks_shrink() -> None:
    torch.manual_seed(0)
    net = tuckerize(_net(c=3, width=8), from_pretrained=False, init_rank=4, rmin=2)
    x, y = _blobs(96, c=3, hw=4, seed=1)
    opt = TDLRTOptimizer(net, 0.2, rmin=2, base="sgd", lr=0.05, momentum=0.9)
    first, last = [], []
    for step in range(300):
        i = step % 6
        xb, yb = x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)]
        loss = float(opt.step(lambda xb=xb, yb=yb: _ce_backward(net, xb, yb)))
        (first if step < 6 else last).append(loss)
        last = last[-6:]
    assert sum(last) / 6 < 0.5 * sum(first) / 6
    assert all(max(r) < 8 for r in opt.ranks().values())  # tau pruned below full rank
    _check_invariants(opt, 2, None)


# -------------------------------------------------------------------------- persistence and logging


def test_state_dict_roundtrip_rebuilds_identical_model(tmp_path: Any) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    net = tuckerize(_net(), from_pretrained=False, init_rank=4)
    x, y = _blobs(32)
    opt = TDLRTOptimizer(net, 0.1, base="adam", lr=0.01)
    for _ in range(5):
        opt.step(lambda: _ce_backward(net, x, y))
    net.eval()
    configs = {name: m.config() for name, m in net.named_modules() if tdlrt.is_tucker_layer(m)}
    assert all(list(c["ranks"]) == list(opt.ranks()[n]) for n, c in configs.items())
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    fresh = _net()
    for name, cfg in configs.items():
        tdlrt._set_submodule(fresh, name, type(net.get_submodule(name)).from_config(cfg))
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    fresh.eval()
    assert torch.equal(fresh(x), net(x))


@pytest.mark.skipif(not REAL_LAYER, reason="needs tensorcut.layers.tucker")
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
    net = _net()
    x, y = _blobs(64)
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
    net = _net()
    x, y = _blobs(64)
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


@pytest.mark.skipif(not REAL_LAYER, reason="needs tensorcut.layers.tucker")
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
    assert any(tdlrt.is_tucker_layer(m) for m in back.modules())


def test_tdlrt_is_a_step_of_the_one_fit_loop() -> None:
    """``train_tdlrt`` is ``tuckerize`` + ``fit(step=TDLRTStep, callbacks=[rank_callback])``: the
    same seed gives bitwise the same history and weights, and the rows carry the ranks."""
    from tensorcut.train.loop import FitConfig, fit
    from tensorcut.train.tdlrt import TDLRTStep, rank_callback

    x, y = _blobs(64)
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    torch.manual_seed(0)
    a = _net()
    hist_a = train_tdlrt(
        a, loader, loader, tau=0.3, init_rank=4, epochs=2, lr=0.01, from_pretrained=False,
        device="cpu", progress=False, distributed=False,
    )  # fmt: skip
    torch.manual_seed(0)
    b = tuckerize(_net(), 4, from_pretrained=False)
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

    x, y = _blobs(32)
    net = tuckerize(_net(), 4, from_pretrained=False)
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

    x, y = _blobs(64)
    torch.manual_seed(0)
    hist = fit(
        _net(), [(x[:32], y[:32]), (x[32:], y[32:])], None, FitConfig(epochs=2, scheduler="none"),
        device="cpu", progress=False, distributed=False, step=Counting(), callbacks=[mark],
    )  # fmt: skip
    assert calls == ["step", "step", "epoch 1", "step", "step", "epoch 2"]
    assert [r["marked"] for r in hist] == [True, True]
