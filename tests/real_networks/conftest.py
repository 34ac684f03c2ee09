"""Fixtures and selection for the real-architecture suite (timm / torchvision models).

Two tiers:

* ``real_tier1`` — about a dozen models that together cover every module type tensorcut must handle
  (plain, grouped, depthwise, TF-same padded, weight-standardised, QAT, unknown subclass, shared
  conv, parents that read conv attributes). They run in the normal suite (``make test``).
* ``real_full`` — every architecture. Deselected unless asked for::

      .venv/bin/python -m pytest tests/real_networks -m real_full

Without timm / torchvision the tests that need them are skipped with the install command.
"""

from __future__ import annotations

from types import ModuleType

import pytest
from _torchvision_ops import import_model_libraries

_HERE = "real_networks"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real_tier1: real-architecture models run by `make test` (tests/real_networks)"
    )
    config.addinivalue_line(
        "markers", "real_full: every real architecture; select with -m real_full (make test-real)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep only the tier-1 cases of this directory unless ``-m`` names ``real_full``."""
    if "real_full" in (config.option.markexpr or ""):
        return
    keep, drop = [], []
    for item in items:
        ours = _HERE in item.path.parts
        (
            drop
            if ours
            and item.get_closest_marker("real_full")
            and not item.get_closest_marker("real_tier1")
            else keep
        ).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def model_zoo() -> tuple[ModuleType, ModuleType]:
    """``(timm, torchvision)``, importable beside the CPU torch wheel; skips if one is missing."""
    return import_model_libraries()
