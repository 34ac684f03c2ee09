"""Model zoo with a small registry: ``create(name, num_classes=..., in_channels=..., width=...)``.

Architectures follow the source documents exactly at ``width=1``:

* ``vanilla-cnn`` — the four-layer CNN of Singh et al. (arXiv 2403.14379, Appendix C):
  18,617,482 parameters for 10 classes at 32x32 RGB.
* ``resnet20`` / ``resnet56`` — He et al.'s CIFAR ResNets with parameter-free "option A"
  shortcuts (269,722 / 853,018 parameters).
* ``resnet18`` / ``resnet34`` / ``resnet50`` / ``vgg11`` / ``vgg16`` / ``vgg19`` — the CIFAR forms
  benchmarked in the thesis (3x3 stem, no max-pool; VGG with BatchNorm and one linear layer).

``width`` scales every channel count (and vanilla-cnn's hidden units) for CPU use.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorcut.errors import TensorcutError

__all__ = ["create", "list_models", "register_model", "model_entry"]


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: its builder and a one-line description."""

    name: str
    builder: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, description: str
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a model builder under ``name``.

    The builder is ``f(num_classes, in_channels, width, input_size) -> nn.Module``.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, fn, description)
        return fn

    return deco


def list_models() -> list[str]:
    """Names of every model in the zoo, sorted.

    Returns:
        The names :func:`create` accepts.

    Raises:
        Nothing: the zoo is a fixed registry.

    Example:
        >>> import tensorcut as tc
        >>> "resnet20" in tc.list_models()
        True
    """
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; unknown names list the valid ones."""
    if name not in _REGISTRY:
        raise TensorcutError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _REGISTRY[name]


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    input_size: int = 32,
    **kwargs: Any,
) -> nn.Module:
    """Build a fresh (randomly initialised) model from tensorcut's zoo.

    Args:
        name: a name from :func:`list_models` (e.g. ``"resnet20"``).
        num_classes: output classes.
        in_channels: input image channels (1 for grey images).
        width: channel multiplier (0.25 for quick experiments).
        input_size: image side in pixels; matters only for vanilla-cnn's first linear layer.
        **kwargs: model-specific options.

    Returns:
        The ``nn.Module``.

    Raises:
        TensorcutError: an unknown name (listing the valid ones) or a non-positive size.

    Example:
        >>> import tensorcut as tc
        >>> model = tc.create_model("resnet20", num_classes=10, width=0.25)
    """
    entry = model_entry(name)
    if num_classes < 1 or in_channels < 1:
        raise TensorcutError(
            f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}"
        )
    if not width > 0:
        raise TensorcutError(f"width must be > 0, got {width}")
    if input_size < 4:
        raise TensorcutError(f"input_size must be >= 4 pixels, got {input_size}")
    return entry.builder(
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        input_size=input_size,
        **kwargs,
    )


def _w(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


# ----------------------------------------------------------------------------- vanilla CNN


class VanillaCNN(nn.Sequential):
    """Appendix C network: conv(5)x2, pool, conv(3)x2, pool, FC 1024 -> 512 -> classes.

    A flat ``nn.Sequential`` with the paper's names (``conv1`` .. ``conv4``, ``fc1`` .. ``fc3``),
    so any suffix of it can be run on cached activations. Dropout rates are not given in
    the paper; 0.25 after the conv blocks and 0.5 in the classifier are used.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        width: float,
        input_size: int,
        conv_dropout: float = 0.25,
        fc_dropout: float = 0.5,
    ) -> None:
        c1, c2, c3, c4 = (_w(c, width) for c in (128, 128, 256, 256))
        h1, h2 = _w(1024, width), _w(512, width)
        spatial = input_size // 2 // 2
        layers: list[tuple[str, nn.Module]] = []
        cin = in_channels
        for i, (c, k, p) in enumerate(((c1, 5, 2), (c2, 5, 2), (c3, 3, 1), (c4, 3, 1)), start=1):
            layers += [
                (f"conv{i}", nn.Conv2d(cin, c, k, padding=p)),
                (f"bn{i}", nn.BatchNorm2d(c)),
                (f"relu{i}", nn.ReLU(inplace=True)),
            ]
            if i in (2, 4):
                layers += [
                    (f"pool{i // 2}", nn.MaxPool2d(2)),
                    (f"drop{i // 2}", nn.Dropout(conv_dropout)),
                ]
            cin = c
        layers += [
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(c4 * spatial * spatial, h1)),
            ("bn_fc1", nn.BatchNorm1d(h1)),
            ("relu_fc1", nn.ReLU(inplace=True)),
            ("drop_fc1", nn.Dropout(fc_dropout)),
            ("fc2", nn.Linear(h1, h2)),
            ("bn_fc2", nn.BatchNorm1d(h2)),
            ("relu_fc2", nn.ReLU(inplace=True)),
            ("drop_fc2", nn.Dropout(fc_dropout)),
            ("fc3", nn.Linear(h2, num_classes)),
        ]
        super().__init__(OrderedDict(layers))


@register_model("vanilla-cnn", "4-conv CNN of Singh et al. Appendix C (18.6M params at width 1)")
def _vanilla(
    num_classes: int, in_channels: int, width: float, input_size: int, **kw: Any
) -> nn.Module:
    return VanillaCNN(num_classes, in_channels, width, input_size, **kw)


# ------------------------------------------------------------------------- CIFAR ResNets (option A)


class _ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad the new channels."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _BlockA(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = _ShortcutA(cout - cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2) with option-A shortcuts."""

    def __init__(self, n: int, num_classes: int, in_channels: int, width: float) -> None:
        super().__init__()
        widths = [_w(16, width), _w(32, width), _w(64, width)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, c in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BlockA(cin, c, stride))
                cin = c
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model("resnet20", "CIFAR ResNet-20, option-A shortcuts (269,722 params)")
def _resnet20(num_classes: int, in_channels: int, width: float, input_size: int) -> nn.Module:
    return CifarResNet(3, num_classes, in_channels, width)


@register_model("resnet56", "CIFAR ResNet-56, option-A shortcuts (853,018 params)")
def _resnet56(num_classes: int, in_channels: int, width: float, input_size: int) -> nn.Module:
    return CifarResNet(9, num_classes, in_channels, width)


# --------------------------------------------------------------------- ResNet-18/34/50 (CIFAR stem)


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18/34/50 with a 3x3 stride-1 stem and no max-pool (CIFAR form)."""

    def __init__(
        self,
        block: type[_Basic] | type[_Bottleneck],
        counts: list[int],
        num_classes: int,
        in_channels: int,
        width: float,
    ) -> None:
        super().__init__()
        planes = [_w(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        cin = planes[0]
        stages = []
        for i, (p, n) in enumerate(zip(planes, counts, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, p, 2 if (i > 0 and j == 0) else 1))
                cin = p * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("resnet18", "ResNet-18, CIFAR form (11,173,962 params)")
def _resnet18(num_classes: int, in_channels: int, width: float, input_size: int) -> nn.Module:
    return ResNet(_Basic, [2, 2, 2, 2], num_classes, in_channels, width)


@register_model("resnet34", "ResNet-34, CIFAR form (21,282,122 params)")
def _resnet34(num_classes: int, in_channels: int, width: float, input_size: int) -> nn.Module:
    return ResNet(_Basic, [3, 4, 6, 3], num_classes, in_channels, width)


@register_model("resnet50", "ResNet-50, CIFAR form (23,520,842 params)")
def _resnet50(num_classes: int, in_channels: int, width: float, input_size: int) -> nn.Module:
    return ResNet(_Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width)


# ----------------------------------------------------------------------------- VGG (CIFAR form)

_VGG_CFG: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
    "vgg19": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}


class VGG(nn.Module):
    """VGG with BatchNorm and a single linear classifier (CIFAR form).

    Pools use ``ceil_mode`` so 28 px (and smaller) inputs work; at 32 px this is the
    standard network.
    """

    def __init__(
        self, cfg: list[int | str], num_classes: int, in_channels: int, width: float
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                c = _w(int(v), width)
                layers += [
                    nn.Conv2d(cin, c, 3, padding=1),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                ]
                cin = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(out)


def _make_vgg(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, width: float, input_size: int) -> nn.Module:
        return VGG(_VGG_CFG[name], num_classes, in_channels, width)

    return build


register_model("vgg11", "VGG-11 with BatchNorm, CIFAR form (9,231,114 params)")(_make_vgg("vgg11"))
register_model("vgg16", "VGG-16 with BatchNorm, CIFAR form (14,728,266 params)")(_make_vgg("vgg16"))
register_model("vgg19", "VGG-19 with BatchNorm, CIFAR form (20,040,522 params)")(_make_vgg("vgg19"))
