"""Small networks, data and reference computations shared by the TDLRT tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorcut.geometry import ConvGeometry, explicit_pad
from tensorcut.layers.tucker import TuckerConv2d
from tensorcut.train.tdlrt_layers import factors, write_factors


def small_net(c: int = 6, width: int = 12, classes: int = 3, bn: bool = True) -> nn.Sequential:
    """conv(c -> width), [BN], ReLU, conv(width -> width, no bias), [BN], ReLU,
    conv(width -> 2 width, stride 2), ReLU, pool, linear: modules "0", "3" and "6" with BN
    ("0", "2", "4" without)."""
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


def blobs(
    n: int = 96, c: int = 6, hw: int = 6, classes: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A separable classification task: noisy copies of one random prototype per class."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, c, hw, hw, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = protos[y] + 0.8 * torch.randn(n, c, hw, hw, generator=g)
    return x, y


def kernel(layer: nn.Module) -> torch.Tensor:
    """The dense kernel ``C x U_out x U_in`` of a Tucker layer."""
    U_out, C, U_in = factors(layer)  # type: ignore[arg-type]
    return torch.einsum("oa,abhw,ib->oihw", U_out, C, U_in)


def conv_ref(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output computed as one dense convolution with its kernel."""
    g = layer.geometry
    bias = layer.last.bias
    return F.conv2d(explicit_pad(x, g), kernel(layer), bias, stride=g.stride, dilation=g.dilation)


def ce_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A closure body: cross-entropy loss, backward, the loss."""
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def build_layer(
    conv: nn.Conv2d, U_out: torch.Tensor, C: torch.Tensor, U_in: torch.Tensor
) -> TuckerConv2d:
    """A Tucker layer of ``conv``'s geometry holding the given factors (and ``conv``'s bias)."""
    layer = TuckerConv2d(ConvGeometry.from_conv(conv), (int(C.shape[0]), int(C.shape[1])))
    with torch.no_grad():
        write_factors(layer, U_out, C, U_in)
        if conv.bias is not None:
            layer.last.bias.copy_(conv.bias)  # type: ignore[union-attr]
    return layer
