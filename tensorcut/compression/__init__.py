"""Compression: ``plan`` decides, ``apply`` swaps, ``compress`` does both, ``decompress`` undoes it.

Shaped like torchao's ``quantize_``: one typed config (:class:`CompressConfig`), one filter
function. ``plan`` is pure and returns a JSON-serialisable :class:`Plan`. The package is named
``compression`` (not ``compress``) so that ``tensorcut.compress`` can be the function.
"""

from tensorcut.compression.config import DEFAULT_METHOD, CompressConfig, FilterFn, default_filter
from tensorcut.compression.plan import LayerPlan, Plan
from tensorcut.compression.planner import plan
from tensorcut.compression.rank import RankRule
from tensorcut.compression.swap import apply, compress, decompress

__all__ = [
    "DEFAULT_METHOD",
    "CompressConfig",
    "FilterFn",
    "LayerPlan",
    "Plan",
    "RankRule",
    "apply",
    "compress",
    "decompress",
    "default_filter",
    "plan",
]
