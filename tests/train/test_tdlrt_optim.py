"""The TDLRT integrator (tensorcut.train.tdlrt_optim.TDLRTOptimizer): invariants after every
step, the projected gradient step, BatchNorm counted once, persistence."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tdlrt_util import blobs, build_layer, ce_backward, conv_ref, kernel, small_net
from torch import nn

from tensorcut.errors import TensorcutError
from tensorcut.geometry import explicit_pad
from tensorcut.train.tdlrt_convert import tuckerize
from tensorcut.train.tdlrt_layers import factors, is_tucker_layer
from tensorcut.train.tdlrt_ops import orthonormality_error
from tensorcut.train.tdlrt_optim import TDLRTOptimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _check_invariants(opt: TDLRTOptimizer, rmin: int, rmax: int | None) -> None:
    for name, layer in opt.layers.items():
        U_out, C, U_in = factors(layer)
        for U in (U_out, U_in):
            assert orthonormality_error(U) < 1e-5, name
            n, r = U.shape
            hi = n if rmax is None else min(rmax, n)
            assert min(rmin, hi) <= r <= hi, (name, r)
        assert C.shape[:2] == (U_out.shape[1], U_in.shape[1])


def test_bad_input_is_reported() -> None:
    with pytest.raises(TensorcutError, match="no Tucker layers"):
        TDLRTOptimizer(small_net(), 0.1)
    net = tuckerize(small_net())
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


@pytest.mark.parametrize(
    ("base", "tau"), [("sgd", 0.0), ("adam", 0.0), ("sgd", 0.6), ("adam", 0.6)]
)
def test_invariants_hold_after_every_step(base: str, tau: float) -> None:
    torch.manual_seed(1)
    net = tuckerize(small_net(), from_pretrained=False, init_rank=3, rmin=2, rmax=7)
    x, y = blobs()
    opt = TDLRTOptimizer(net, tau, rmin=2, rmax=7, base=base, lr=0.05 if base == "sgd" else 0.01)
    seen = set()
    for i in range(12):
        xb, yb = x[i % 3 * 32 : (i % 3 + 1) * 32], y[i % 3 * 32 : (i % 3 + 1) * 32]
        opt.step(lambda xb=xb, yb=yb: ce_backward(net, xb, yb))
        _check_invariants(opt, 2, 7)
        for layer in opt.layers.values():  # the core's optimiser state follows its shape
            st = opt.base.state.get(layer.core.weight, {})
            for k in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if k in st:
                    assert st[k].shape == layer.core.weight.shape
        seen |= {r for rr in opt.ranks().values() for r in rr}
        layer = next(iter(opt.layers.values()))
        xin = torch.randn(2, layer.geometry.in_channels, 6, 6)
        assert torch.allclose(layer(xin), conv_ref(layer, xin), atol=1e-5)
    final = {r for rr in opt.ranks().values() for r in rr}
    if tau == 0:
        assert final == {7} and 6 in seen  # tau = 0 truncates nothing: 3 -> 6 -> rmax
    else:
        assert min(seen) == 2  # a large tau prunes down to rmin


def _single_layer_problem(
    r: int, n: int = 6, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(n, n, 3, padding=1)
    layer = build_layer(
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
    W0 = kernel(layer).clone()
    L0, G = _dense_loss_and_grad(layer, W0, x, t)

    def closure() -> torch.Tensor:
        loss = 0.5 * (model(x) - t).pow(2).mean()
        loss.backward()
        return loss

    assert abs(float(opt.step(closure)) - L0) < 1e-6
    W1 = kernel(layer)
    U_out, _, U_in = factors(layer)
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
    U_out0, C0, U_in0 = (a.clone() for a in factors(layer))
    _, G = _dense_loss_and_grad(layer, kernel(layer), x, t)
    opt = TDLRTOptimizer(nn.Sequential(layer), 0.0, rmin=1, lr=1e-4, momentum=0.0)
    opt.step(lambda: _mse_backward(layer, x, t))
    U_out, _, U_in = factors(layer)
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
    net = tuckerize(small_net(), rmax=6)
    ref = tuckerize(small_net(), rmax=6)
    ref.load_state_dict(net.state_dict())
    x, y = blobs(32)
    opt = TDLRTOptimizer(net, 0.1, rmax=6)
    opt.step(lambda: ce_backward(net, x, y))
    ref.train()
    with torch.no_grad():
        ref(x)
    assert torch.allclose(net[1].running_mean, ref[1].running_mean, atol=1e-6)
    assert int(net[1].num_batches_tracked) == 1


def test_loss_decreases_on_synthetic_task_and_ranks_shrink() -> None:
    torch.manual_seed(0)
    net = tuckerize(small_net(c=3, width=8), from_pretrained=False, init_rank=4, rmin=2)
    x, y = blobs(96, c=3, hw=4, seed=1)
    opt = TDLRTOptimizer(net, 0.2, rmin=2, base="sgd", lr=0.05, momentum=0.9)
    first, last = [], []
    for step in range(300):
        i = step % 6
        xb, yb = x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)]
        loss = float(opt.step(lambda xb=xb, yb=yb: ce_backward(net, xb, yb)))
        (first if step < 6 else last).append(loss)
        last = last[-6:]
    assert sum(last) / 6 < 0.5 * sum(first) / 6
    assert all(max(r) < 8 for r in opt.ranks().values())  # tau pruned below full rank
    _check_invariants(opt, 2, None)


def test_state_dict_roundtrip_rebuilds_identical_model(tmp_path: Any) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    net = tuckerize(small_net(), from_pretrained=False, init_rank=4)
    x, y = blobs(32)
    opt = TDLRTOptimizer(net, 0.1, base="adam", lr=0.01)
    for _ in range(5):
        opt.step(lambda: ce_backward(net, x, y))
    net.eval()
    configs = {name: m.config() for name, m in net.named_modules() if is_tucker_layer(m)}
    assert all(list(c["ranks"]) == list(opt.ranks()[n]) for n, c in configs.items())
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    fresh = small_net()
    for name, cfg in configs.items():
        fresh.set_submodule(name, type(net.get_submodule(name)).from_config(cfg))
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    fresh.eval()
    assert torch.equal(fresh(x), net(x))
