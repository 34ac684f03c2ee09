"""The real architectures the suite runs: (id, constructor, input size), plus the shared checking
code.

Every constructor builds the smallest variant of its family with random weights (no downloads),
10 classes, ``eval()`` and float64. :func:`randomize_constants` then replaces every constant
parameter (BatchNorm gamma/beta, zero-initialised residual gains such as NFNet's ``skipinit_gain``,
ConvNeXt/EdgeNeXt layer scales at 1e-6, timm's ``gain`` of scaled weight standardisation, QAT
``bn.*``) and the BatchNorm running statistics by random values: otherwise whole residual branches
contribute nothing to the output and a wrongly compressed conv inside one would go unnoticed.

Shared by ``test_real_networks.py`` and ``benchmarks/bench_real_networks.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from _torchvision_ops import import_model_libraries
from torch import nn
from torch.nn import functional as F

__all__ = ["ARCHS", "Arch", "by_id", "make_input", "build", "randomize_constants"]

SEED = 0


@dataclass(frozen=True)
class Arch:
    """One architecture: ``build()``: a fresh float32 model; ``size``: the input height/width."""

    id: str
    build: Callable[[], nn.Module]
    size: int = 64
    tier1: bool = False
    covers: str = ""  # the module type this entry is in the tier for
    attention: bool = (
        False  # runs matmuls outside Conv2d / Linear (attention): no whole-model FLOP cross-check
    )
    onnx: bool = False  # exported to ONNX and compared in the ratio test


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        timm, _ = import_model_libraries()
        return timm.create_model(name, pretrained=False, num_classes=10, **kw)

    return make


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        _, tv = import_model_libraries()
        return tv.models.get_model(name, weights=None, num_classes=10, **kw)

    return make


def _tv_vgg11_bn() -> nn.Module:
    """torchvision VGG-11-BN; the 4096-wide classifier (120M parameters) replaced by global pooling
    and one Linear, so the conv stack is what the test is about and float64 fits in memory."""
    _, tv = import_model_libraries()
    m = tv.models.vgg11_bn(weights=None, num_classes=10)
    m.avgpool = nn.AdaptiveAvgPool2d(1)
    m.classifier = nn.Linear(512, 10)
    return m


def _tv_wide_resnet() -> nn.Module:
    """torchvision's Wide-ResNet block (Bottleneck, width_per_group=128, as wide_resnet50_2) at one
    block per stage: the same module types at a fifth of the depth."""
    _, tv = import_model_libraries()
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=128, num_classes=10)


def _tv_resnext_small() -> nn.Module:
    """torchvision ResNeXt (Bottleneck, 32 groups x 4) at one block per stage."""
    _, tv = import_model_libraries()
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4, num_classes=10)


def _bit(same: bool, wide: bool = False) -> Callable[[], nn.Module]:
    """timm ResNetV2-BiT (pre-activation, GroupNorm, weight-standardised convs) at one block per
    stage; ``same``: TF-same padded ``StdConv2dSame`` (as the R50 backbone of timm's hybrid ViTs).
    ``wide``: resnetv2_50x1_bit's widths, else narrow stages with 8-group GroupNorm (the micro
    tier-1 model)."""

    def make() -> nn.Module:
        import_model_libraries()
        from timm.layers import GroupNormAct, StdConv2d, StdConv2dSame
        from timm.models.resnetv2 import ResNetV2

        conv = functools.partial(StdConv2dSame if same else StdConv2d, eps=1e-8)
        kw: dict[str, Any] = (
            {}
            if wide
            else {
                "channels": (64, 96, 128, 160),
                "stem_chs": 32,
                "norm_layer": functools.partial(GroupNormAct, num_groups=8),
            }
        )
        return ResNetV2(
            layers=[1, 1, 1, 1],
            stem_type="same" if same else "fixed",
            conv_layer=conv,
            num_classes=10,
            **kw,
        )

    return make


def _dm_nfnet(**over: Any) -> nn.Module:
    import_model_libraries()
    from timm.models.nfnet import NormFreeNet, model_cfgs

    return NormFreeNet(dataclasses.replace(model_cfgs["dm_nfnet_f0"], **over), num_classes=10)


def _dm_nfnet_micro() -> nn.Module:
    """timm's dm_nfnet_f0 configuration (TF-same padded ``ScaledStdConv2dSame``, skipinit, GELU) at
    test_nfnet's size (dm_nfnet_f0 itself has 72M parameters)."""
    return _dm_nfnet(
        depths=(1, 1, 1, 1), channels=(32, 64, 96, 128), stem_chs=16, num_features=192, group_size=8
    )


def _dm_nfnet_d1() -> nn.Module:
    """dm_nfnet_f0 at one block per stage, narrower stages."""
    return _dm_nfnet(
        depths=(1, 1, 1, 1),
        channels=(64, 128, 192, 256),
        stem_chs=32,
        num_features=384,
        group_size=32,
    )


def _tv_qat_resnet18() -> nn.Module:
    """torchvision's quantizable ResNet-18, fused for QAT (ConvBnReLU2d / ConvBn2d) and
    prepare_qat'ed; observers and fake quantisation disabled so it computes in floating point."""
    _, tv = import_model_libraries()
    from torchvision.models.quantization import resnet18

    m = resnet18(weights=None, quantize=False, num_classes=10)
    m.train()
    m.fuse_model(is_qat=True)
    return _prepare_qat(m)


def _prepare_qat(m: nn.Module) -> nn.Module:
    from torch.ao import quantization as tq

    m.train()
    m.qconfig = tq.get_default_qat_qconfig("fbgemm")
    tq.prepare_qat(m, inplace=True)
    m.apply(tq.disable_observer)
    m.apply(tq.disable_fake_quant)
    return m


class QatMixed(nn.Module):
    """Eager-mode QAT on a small net: ConvBnReLU2d, ConvBn2d and a bare qat.Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r1(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = self.c3(x)
        return self.head(x.mean((2, 3)))


def _qat_mixed() -> nn.Module:
    from torch.ao.quantization import fuse_modules_qat

    m = QatMixed().train()
    fuse_modules_qat(m, [["c1", "b1", "r1"], ["c2", "b2"]], inplace=True)
    return _prepare_qat(m)


class SharedConvNet(nn.Module):
    """One 3x3 conv reachable under two names (``block_a`` and ``block_b.conv``), applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.block_a = nn.Conv2d(24, 24, 3, padding=1)
        self.block_b = nn.Sequential()
        self.block_b.add_module("conv", self.block_a)
        self.mid = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.block_a(x)) + x
        x = F.relu(self.block_b(x)) + x
        x = F.relu(self.mid(x))
        return self.head(x.mean((2, 3)))


class OddConv2d(nn.Conv2d):
    """A user's Conv2d subclass with its own forward, unknown to tensorcut.

    The forward applies a learned per-channel output scale.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out_scale = nn.Parameter(torch.ones(self.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.out_scale.view(1, -1, 1, 1)


class CustomForwardNet(nn.Module):
    """Plain convs around one :class:`OddConv2d`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.odd = OddConv2d(24, 32, 3, padding=1)
        self.plain = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.odd(x))
        x = F.relu(self.plain(x))
        return self.head(x.mean((2, 3)))


ARCHS: list[Arch] = [
    # ---- tier 1 (in `make test`): tiny models that together cover every module type of issue 14
    Arch(
        "tv_shufflenet_v2_x0_5",
        _tv("shufflenet_v2_x0_5"),
        tier1=True,
        covers="plain nn.Conv2d (torchvision), depthwise",
    ),
    Arch(
        "timm_test_resnet",
        _timm("test_resnet"),
        tier1=True,
        covers="plain nn.Conv2d (timm ResNet)",
        onnx=True,
    ),
    Arch(
        "timm_test_efficientnet_same",
        _timm("test_efficientnet", pad_type="same"),
        tier1=True,
        covers="Conv2dSame (TF-same padding, as the tf_* EfficientNets), depthwise",
        onnx=True,
    ),
    Arch("timm_resnetv2_bit_micro", _bit(False), tier1=True, covers="StdConv2d (ResNetV2-BiT)"),
    Arch("timm_resnetv2_bit_same_micro", _bit(True), tier1=True, covers="StdConv2dSame"),
    Arch(
        "timm_test_nfnet", _timm("test_nfnet"), tier1=True, covers="ScaledStdConv2d, grouped convs"
    ),
    Arch(
        "timm_dm_nfnet_micro",
        _dm_nfnet_micro,
        tier1=True,
        covers="ScaledStdConv2dSame (dm_nfnet)",
        onnx=True,
    ),
    Arch("qat_mixed", _qat_mixed, tier1=True, covers="QAT ConvBnReLU2d / ConvBn2d / qat.Conv2d"),
    Arch(
        "custom_forward_net",
        CustomForwardNet,
        tier1=True,
        covers="unknown Conv2d subclass with its own forward",
    ),
    Arch(
        "shared_conv_net", SharedConvNet, tier1=True, covers="one conv under two names", onnx=True
    ),
    Arch(
        "timm_edgenext_xx_small_d1",
        _timm("edgenext_xx_small", depths=(1, 1, 1, 1)),
        tier1=True,
        covers="parent reads conv attributes (positional encoding)",
        attention=True,
    ),
    Arch(
        "timm_xcit_nano_p16_d2",
        _timm("xcit_nano_12_p16_224", img_size=64, depth=2),
        tier1=True,
        covers="parent reads conv attributes (positional encoding)",
        attention=True,
    ),
    # ---- full set
    Arch("timm_regnetx_002", _timm("regnetx_002")),
    Arch(
        "timm_tf_mobilenetv3_small_minimal_100",
        _timm("tf_mobilenetv3_small_minimal_100"),
        onnx=True,
    ),
    Arch("timm_edgenext_xx_small", _timm("edgenext_xx_small"), attention=True),
    Arch("timm_xcit_nano_12_p16", _timm("xcit_nano_12_p16_224", img_size=64), attention=True),
    Arch("timm_dm_nfnet_f0_d1", _dm_nfnet_d1),
    Arch("timm_resnetv2_50x1_bit_d1", _bit(False, wide=True)),
    Arch("tv_densenet121", _tv("densenet121")),
    Arch("tv_googlenet", _tv("googlenet", aux_logits=False, init_weights=True), onnx=True),
    Arch("tv_mobilenet_v2", _tv("mobilenet_v2")),
    Arch("tv_mobilenet_v3_small", _tv("mobilenet_v3_small")),
    Arch("tv_efficientnet_b0", _tv("efficientnet_b0")),
    Arch("tv_mnasnet0_5", _tv("mnasnet0_5")),
    Arch("tv_squeezenet1_1", _tv("squeezenet1_1")),
    Arch("tv_regnet_x_400mf", _tv("regnet_x_400mf")),
    Arch("tv_regnet_y_400mf", _tv("regnet_y_400mf")),
    Arch("timm_resnet10t", _timm("resnet10t")),
    Arch("timm_efficientnet_b0", _timm("efficientnet_b0")),
    Arch("timm_tf_efficientnet_b0", _timm("tf_efficientnet_b0")),
    Arch("timm_tf_efficientnetv2_b0", _timm("tf_efficientnetv2_b0"), onnx=True),
    Arch("timm_test_efficientnet", _timm("test_efficientnet")),
    Arch("timm_mobilenetv3_small_050", _timm("mobilenetv3_small_050")),
    Arch("timm_mnasnet_small", _timm("mnasnet_small")),
    Arch("timm_ghostnet_050", _timm("ghostnet_050")),
    Arch("timm_convnext_atto", _timm("convnext_atto")),
    Arch("timm_test_convnext", _timm("test_convnext")),
    Arch("timm_regnety_002", _timm("regnety_002")),
    Arch("timm_nf_regnet_b0", _timm("nf_regnet_b0")),
    Arch("timm_tf_mixnet_s", _timm("tf_mixnet_s")),
    Arch("timm_lcnet_050", _timm("lcnet_050")),
    Arch("timm_test_byobnet", _timm("test_byobnet")),
    Arch("timm_densenet121", _timm("densenet121")),
    Arch("tv_resnet50", _tv("resnet50")),
    Arch("tv_wide_resnet_1111_2", _tv_wide_resnet),
    Arch("tv_inception_v3", _tv("inception_v3", aux_logits=False, init_weights=True), size=80),
    Arch("tv_efficientnet_v2_s", _tv("efficientnet_v2_s")),
    Arch("tv_convnext_tiny", _tv("convnext_tiny")),
    Arch("tv_qat_resnet18", _tv_qat_resnet18),
    Arch("tv_vgg11_bn", _tv_vgg11_bn),
    Arch("tv_resnext_1111_32x4d", _tv_resnext_small),
    Arch("tv_resnet18", _tv("resnet18"), onnx=True),
]


def by_id(arch_id: str) -> Arch:
    """The registry entry named ``arch_id``."""
    for a in ARCHS:
        if a.id == arch_id:
            return a
    raise KeyError(arch_id)


@torch.no_grad()
def randomize_constants(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Replace every constant floating parameter with U(0.5, 1.5) values and BatchNorm running
    statistics with random ones (see the module docstring); returns the model."""
    g = torch.Generator().manual_seed(seed + 1)
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or not p.is_floating_point() or p.numel() == 0:
            continue
        seen.add(id(p))
        flat = p.detach().reshape(-1)
        if bool((flat == flat[0]).all()):
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype) + 0.5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(
                0.1 * torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64)
            )
            m.running_var.copy_(
                torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5
            )
    return model


def build(arch: Arch) -> nn.Module:
    """A fresh, seeded, randomized, eval-mode float64 instance of ``arch``."""
    torch.manual_seed(SEED)
    model = arch.build()
    return randomize_constants(model.eval().double())


def make_input(arch: Arch, batch: int = 2, seed: int = SEED) -> torch.Tensor:
    """A seeded float64 image batch of the architecture's input size."""
    g = torch.Generator().manual_seed(seed + 2)
    return torch.randn(batch, 3, arch.size, arch.size, generator=g, dtype=torch.float64)


def clone(model: nn.Module) -> nn.Module:
    """An independent copy (compress swaps modules in place)."""
    return copy.deepcopy(model)


# ----------------------------------------------------------------------------- shared checks

#: Module classes tensorcut must leave dense (with a reason): eager-mode QAT convolutions.
QAT_TYPES = ("ConvBn2d", "ConvBnReLU2d", "ConvReLU2d")


def full_rank() -> int | str:
    """``rank='full'`` once tensorcut accepts it; before that a rank above every maximum (clamped,
    with a RankClampWarning the caller suppresses)."""
    from tensorcut.compression import CompressConfig
    from tensorcut.errors import TensorcutError

    try:
        CompressConfig(method="tucker2", rank="full")
    except (TensorcutError, ValueError, TypeError):
        return 10**6
    return "full"


def select_all(name: str, module: nn.Module) -> bool:
    """Filter selecting every convolution (stems and depthwise included: tensorcut decides)."""
    return True


def run_compress(model: nn.Module, arch: Arch, method: str, **rule: Any) -> tuple[nn.Module, Any]:
    """``tensorcut.compression`` on ``model`` (in place), every conv selected, warnings silenced."""
    import warnings

    from tensorcut.compression import compress

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compress(
            model,
            method=method,
            input_shape=(3, arch.size, arch.size),
            filter_fn=select_all,
            progress=False,
            **rule,
        )


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||got - ref|| / ||ref||."""
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def param_count(model: nn.Module) -> int:
    """Distinct parameters (a shared one counted once)."""
    return sum(p.numel() for p in model.parameters())


def is_factorized(m: nn.Module) -> bool:
    """A tensorcut factorized layer."""
    from tensorcut.layers.base import FactorizedConv2d

    return isinstance(m, FactorizedConv2d)


def measured_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """MACs per image counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward of
    ``x``: ``(units, everything)``.

    ``units``: the FLOPs executed inside each Conv2d / Linear module and each factorized layer (its
    1x1 sublayers run as mm/addmm/bmm/baddbmm GEMMs), each distinct module once, halved. This is the
    conv + linear MAC count tensorcut's cost model must reproduce; attention matmuls of hybrid
    models run outside such modules and are not in it. ``everything``: all FLOPs the counter saw,
    halved; for a pure CNN it must equal ``units`` (nothing else multiplies), which cross-checks the
    attribution.
    """
    from torch.utils.flop_counter import FlopCounterMode

    units: list[nn.Module] = []
    inside: set[int] = set()
    for _, m in model.named_modules():
        if id(m) in inside:
            continue
        if is_factorized(m) or isinstance(m, (nn.Conv2d, nn.Linear)):
            units.append(m)
            inside.update(id(s) for s in m.modules())
    names: dict[int, set[str]] = {}
    root = type(model).__name__
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), set()).add(f"{root}.{n}" if n else root)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts()
    total = 0
    for m in units:
        for key in names[id(m)]:
            total += sum(counts.get(key, {}).values())
    batch = x.shape[0]
    return total // 2 // batch, counter.get_total_flops() // 2 // batch


def conv_kinds(model: nn.Module) -> dict[str, str]:
    """Every Conv2d's name -> class name (a shared module under its first name only)."""
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def is_depthwise(m: nn.Conv2d) -> bool:
    """Depthwise: one input channel per group."""
    return m.groups > 1 and m.groups == m.in_channels


def supported(m: nn.Module) -> bool:
    """A conv tensorcut must be able to factorize exactly: plain Conv2d or one of timm's padding /
    weight-standardising subclasses (not depthwise, not QAT, not an unknown subclass)."""
    known = (
        "Conv2d",
        "Conv2dSame",
        "StdConv2d",
        "StdConv2dSame",
        "ScaledStdConv2d",
        "ScaledStdConv2dSame",
    )
    if not isinstance(m, nn.Conv2d) or is_depthwise(m) or type(m).__name__ not in known:
        return False
    return type(m).__module__.split(".")[0] in ("torch", "timm") and "qat" not in type(m).__module__
