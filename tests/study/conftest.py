"""Keep the analysis tests single-threaded: tiny tensors, shared 2-core machine."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every analysis test runs on one torch thread (the shared ``one_thread`` fixture)."""
