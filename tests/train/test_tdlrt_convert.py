"""TDLRT conversion (tensorcut.train.tdlrt_convert): the plan, the swap through
tensorcut.compression.apply, eligibility, starting ranks, padding, fresh starts, existing layers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tdlrt_util import conv_ref, kernel, small_net
from torch import nn

from tensorcut import models
from tensorcut.compression import Plan, default_filter
from tensorcut.errors import TensorcutError
from tensorcut.layers.tucker import TuckerConv2d
from tensorcut.train import tdlrt_convert
from tensorcut.train.tdlrt_convert import tdlrt_plan, tuckerize
from tensorcut.train.tdlrt_layers import dense_convs, factors, is_tucker_layer
from tensorcut.train.tdlrt_ops import orthonormality_error

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tuckerize_pretrained_full_rank_is_exact_and_skips_first() -> None:
    torch.manual_seed(0)
    net = small_net(bn=False).eval()
    x = torch.randn(4, 6, 6, 6)
    ref = net(x)
    tuckerize(net)
    assert isinstance(net[0], nn.Conv2d) and not is_tucker_layer(net[0])
    assert is_tucker_layer(net[2]) and is_tucker_layer(net[4])
    assert torch.allclose(net(x), ref, atol=1e-5)
    for layer in (net[2], net[4]):
        xin = torch.randn(2, layer.geometry.in_channels, 7, 7)
        assert torch.allclose(layer(xin), conv_ref(layer, xin), atol=1e-5)


def test_tuckerize_scratch_ranks_filter_and_existing_layers() -> None:
    torch.manual_seed(0)
    net = small_net()
    tuckerize(
        net, from_pretrained=False, rmin=2, rmax=5, filter=lambda name, conv: conv.stride == (1, 1)
    )
    assert is_tucker_layer(net[3]) and isinstance(net[6], nn.Conv2d)  # stride-2 conv filtered out
    assert net[3].core.weight.shape[:2] == (5, 5)  # ceil(12/2) = 6, capped at rmax = 5
    assert orthonormality_error(factors(net[3])[0]) < 1e-5
    # an existing Tucker layer with non-orthonormal factors is normalised exactly, then truncated
    layer = net[3]
    with torch.no_grad():
        layer.last.weight.mul_(3.0)
        layer.first.weight.add_(0.1)
    x = torch.randn(2, 12, 6, 6)
    before = layer(x)
    tuckerize(net, rmin=2, rmax=5)
    assert orthonormality_error(factors(layer)[0]) < 1e-5
    assert orthonormality_error(factors(layer)[2]) < 1e-5
    assert torch.allclose(layer(x), before, atol=1e-4)
    tuckerize(net, init_rank=3, rmin=2)
    assert layer.core.weight.shape[:2] == (3, 3)
    other = tuckerize(
        small_net(), init_rank={"3": (4, 2), "6": 5}, rmin=1
    )  # per-layer ranks, e.g. another run's
    assert other[3].core.weight.shape[:2] == (4, 2) and other[6].core.weight.shape[:2] == (5, 5)


def test_the_swap_is_compression_apply_with_the_tdlrt_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """tuckerize hands tdlrt_plan's plan to tensorcut.compression.apply; the plan survives JSON
    and, applied to a copy, gives bitwise the same layers."""
    seen: list[Plan] = []
    real = tdlrt_convert.apply

    def spy(model: nn.Module, plan: Plan) -> nn.Module:
        seen.append(plan)
        return real(model, plan)

    monkeypatch.setattr(tdlrt_convert, "apply", spy)
    torch.manual_seed(0)
    a = small_net()
    b = small_net()
    b.load_state_dict(a.state_dict())
    p = tdlrt_plan(a, init_rank={"3": (4, 3)})
    tuckerize(a, init_rank={"3": (4, 3)})
    assert len(seen) == 1 and seen[0].to_dict() == p.to_dict()
    assert [(e.name, e.method, e.status, e.ranks) for e in p.layers] == [
        ("3", TuckerConv2d.method, "factorize", [4, 3]),
        ("6", TuckerConv2d.method, "factorize", [24, 12]),
    ]
    assert all(e.options == {"hooi": False} for e in p.layers)  # truncated HOSVD
    real(b, Plan.from_dict(p.to_dict()))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_eligibility_is_the_default_filter_ungrouped_and_not_the_first() -> None:
    class Net(nn.Module):
        def __init__(self, stem: int) -> None:
            super().__init__()
            self.stem = nn.Conv2d(stem, 6, 3, padding=1)
            self.thin = nn.Conv2d(6, 3, 1)
            self.narrow_in = nn.Conv2d(3, 8, 3, padding=1)  # 3 input channels: left dense
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.wide = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.wide(self.grouped(self.narrow_in(self.thin(self.stem(x)))))

    def converted(m: nn.Module, **kw: Any) -> list[str]:
        return [e.name for e in tdlrt_plan(m, **kw).layers]

    assert converted(Net(3)) == ["thin", "wide"]
    assert converted(Net(3), skip_first=False) == ["thin", "wide"]  # a stem: default_filter
    assert converted(Net(6)) == ["thin", "wide"]  # skip_first: a stem of 6 channels too
    assert converted(Net(6), skip_first=False) == ["stem", "thin", "wide"]
    every = lambda name, conv: True  # noqa: E731
    assert converted(Net(3), filter=every) == ["thin", "narrow_in", "wide"]
    assert converted(Net(3), filter=every, skip_first=False) == [
        "stem",
        "thin",
        "narrow_in",
        "wide",
    ]


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("vanilla-cnn", {"width": 0.25, "input_size": 16}),
        ("vanilla-cnn", {"width": 0.25, "in_channels": 1, "input_size": 16}),
        ("resnet20", {"width": 0.25}),
        ("resnet20", {"width": 1.0, "in_channels": 1}),
    ],
)
def test_zoo_models_convert_what_compression_would_and_all_but_the_stem(
    name: str, kw: dict[str, Any]
) -> None:
    """On the zoo's networks (inputs of <= 3 channels, every later conv wider) the compression's
    rule and the former one (every ungrouped conv but the first) select the same layers."""
    m = models.create(name, **kw)
    convs = dense_convs(m)
    plan = [e.name for e in tdlrt_plan(m).layers]
    assert plan == [n for n, c in convs if default_filter(n, c)]
    assert plan == [n for n, c in convs[1:] if c.groups == 1]


def test_a_kernel_of_low_useful_rank_is_padded_exactly() -> None:
    """A 1x1 conv 4 -> 10: the out-mode unfolding has rank <= 4, the start wants 10 (full)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(5, 4, 1), nn.Conv2d(4, 10, 1), nn.Conv2d(10, 6, 3, padding=1))
    x = torch.randn(2, 5, 4, 4)
    ref = m(x)
    p = tdlrt_plan(m)
    assert [e.ranks for e in p.layers] == [[4, 4], [6, 10]]  # clipped to what the kernels admit
    tuckerize(m)
    assert m[1].core.weight.shape[:2] == (10, 4) and m[2].core.weight.shape[:2] == (6, 10)
    for layer in (m[1], m[2]):
        assert all(orthonormality_error(U) < 1e-5 for U in factors(layer)[::2])
    assert torch.allclose(m(x), ref, atol=1e-5)


def test_a_fresh_start_is_random_orthonormal_at_the_norm_of_the_kernel() -> None:
    torch.manual_seed(0)
    m = small_net(c=3)
    norms = {n: float(torch.linalg.vector_norm(c.weight.detach())) for n, c in dense_convs(m)}
    tuckerize(m, from_pretrained=False)
    for name in ("3", "6"):
        layer = m.get_submodule(name)
        U_out, C, U_in = factors(layer)
        n_out, n_in = layer.geometry.out_channels, layer.geometry.in_channels
        assert tuple(C.shape[:2]) == ((n_out + 1) // 2, (n_in + 1) // 2)  # ceil(n / 2)
        assert orthonormality_error(U_out) < 1e-5 and orthonormality_error(U_in) < 1e-5
        assert float(torch.linalg.vector_norm(kernel(layer))) == pytest.approx(norms[name])
    torch.manual_seed(0)  # the same seed draws the same start
    again = tuckerize(small_net(c=3), from_pretrained=False)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters(), strict=True))


def test_building_the_layers_draws_nothing_from_the_stream() -> None:
    """A lossless start at full rank uses no random numbers (layer construction is forked off)."""
    torch.manual_seed(0)
    m = small_net()
    state = torch.get_rng_state()
    tuckerize(m)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_conv_with_its_own_forward_stays_dense() -> None:
    class Doubled(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    m = nn.Sequential(nn.Conv2d(3, 8, 3), Doubled(8, 8, 3), nn.Conv2d(8, 8, 3))
    tuckerize(m)
    assert type(m[1]) is Doubled and is_tucker_layer(m[2])


def test_train_mode_follows_the_dense_conv() -> None:
    m = small_net().eval()
    tuckerize(m)
    assert not m[3].training and not m[3].core.training


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"init_rank": 0}, "init_rank must be >= 1; got 0"),
        ({"init_rank": (2, 3, 4)}, "init_rank is an int or a pair (r_out, r_in); got (2, 3, 4)"),
        ({"rmin": 0}, "rmin must be >= 1; got 0"),
        ({"rmin": 4, "rmax": 3}, "rmax (3) must be >= rmin (4)"),
    ],
)
def test_bad_arguments(kw: dict[str, Any], msg: str) -> None:
    m = small_net()
    before = [type(c) for c in m]
    with pytest.raises(TensorcutError) as e:
        tuckerize(m, **kw)
    assert str(e.value) == msg and [type(c) for c in m] == before
    with pytest.raises(TensorcutError, match="tuckerize needs an nn.Module; got str"):
        tuckerize("resnet20")  # type: ignore[arg-type]
