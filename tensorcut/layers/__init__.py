"""Factorized layers: nn.Modules built from decomposed kernels."""

from tensorcut.layers.base import LAYER_REGISTRY, ConvGeometry, FactorizedConv2d, register_layer
from tensorcut.layers.cp import CPConv2d
from tensorcut.layers.linear import SVDLinear
from tensorcut.layers.tr import TRConv2d
from tensorcut.layers.tt import TTConv2d
from tensorcut.layers.tucker import FullTuckerConv2d, TuckerConv2d

__all__ = [
    "LAYER_REGISTRY",
    "CPConv2d",
    "ConvGeometry",
    "FactorizedConv2d",
    "FullTuckerConv2d",
    "SVDLinear",
    "TTConv2d",
    "TuckerConv2d",
    "register_layer",
]
