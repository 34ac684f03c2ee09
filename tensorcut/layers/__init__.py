"""Factorized layers: nn.Modules built from decomposed kernels, one method per file.

The registry (:func:`register_method`, :func:`get_method`, :func:`list_methods`) maps a method
name to its layer class; every class declares the contract the planner relies on
(:class:`FactorizedConv2d`).
"""

from tensorcut.geometry import ConvGeometry
from tensorcut.layers._registry import (
    LAYER_REGISTRY,
    get_method,
    layer_class,
    list_methods,
    register_layer,
    register_method,
)
from tensorcut.layers.base import FactorizedConv2d, MethodOptions
from tensorcut.layers.cp import CPConv2d, CPOptions
from tensorcut.layers.linear import SVDLinear
from tensorcut.layers.tr import TRConv2d, TROptions
from tensorcut.layers.tt import TTConv2d
from tensorcut.layers.tucker import FullTuckerConv2d, TuckerConv2d, TuckerOptions

__all__ = [
    "LAYER_REGISTRY",
    "CPConv2d",
    "CPOptions",
    "ConvGeometry",
    "FactorizedConv2d",
    "FullTuckerConv2d",
    "MethodOptions",
    "SVDLinear",
    "TROptions",
    "TRConv2d",
    "TTConv2d",
    "TuckerConv2d",
    "TuckerOptions",
    "get_method",
    "layer_class",
    "list_methods",
    "register_layer",
    "register_method",
]
