"""The method registry (``layers/_registry.py``): register_method / get_method / list_methods."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import tensorcut.layers  # noqa: F401  (registers every layer class)
from tensorcut.errors import TensorcutError
from tensorcut.layers import CPConv2d, FullTuckerConv2d, TRConv2d, TTConv2d, TuckerConv2d
from tensorcut.layers._registry import (
    LAYER_REGISTRY,
    get_method,
    list_methods,
    register_method,
)


@pytest.fixture
def restore_registry() -> Iterator[None]:
    """Leave the process-wide registry as it was (tests here register throw-away methods)."""
    before = dict(LAYER_REGISTRY)
    yield
    LAYER_REGISTRY.clear()
    LAYER_REGISTRY.update(before)


def test_registry_has_the_core_methods() -> None:
    assert {"cp", "tt", "tucker", "tucker2"} <= set(LAYER_REGISTRY)
    assert (
        LAYER_REGISTRY["tucker2"] is TuckerConv2d and LAYER_REGISTRY["tucker"] is FullTuckerConv2d
    )
    assert LAYER_REGISTRY["cp"] is CPConv2d and LAYER_REGISTRY["tt"] is TTConv2d


def test_list_methods_sorted_and_auto_subset() -> None:
    names = list_methods()
    assert names == sorted(LAYER_REGISTRY)
    assert {"cp", "tr", "tt", "tucker", "tucker2"} <= set(names)
    auto = list_methods(auto=True)
    assert auto == [n for n in names if LAYER_REGISTRY[n].in_auto]
    assert "tucker" not in auto and "tucker2" in auto


def test_get_method_returns_the_class() -> None:
    assert get_method("tr") is TRConv2d
    assert get_method("tucker2") is TuckerConv2d


@pytest.mark.parametrize("bad", ["svd3", "", "TUCKER2", 3, None])
def test_unknown_method_says_choose_one_of(bad: object) -> None:
    with pytest.raises(TensorcutError) as e:
        get_method(bad)  # type: ignore[arg-type]
    assert str(e.value) == (f"unknown method {bad!r}; choose one of: cp, tr, tt, tucker, tucker2")


def test_register_a_new_method_by_decorator(restore_registry: None) -> None:
    @register_method
    class MyTucker(TuckerConv2d):
        method = "my-tucker"

    assert get_method("my-tucker") is MyTucker and "my-tucker" in list_methods()
    # registering the same class again is harmless (re-import of the defining module)
    assert register_method(MyTucker) is MyTucker
    with pytest.raises(TensorcutError) as e:
        get_method("nope")
    assert "my-tucker" in str(e.value)


def test_register_refuses_bad_names(restore_registry: None) -> None:
    class NoName(TuckerConv2d):
        method = ""

    with pytest.raises(TensorcutError) as e:
        register_method(NoName)
    assert str(e.value) == "NoName has no method name; set `method = '<name>'`"

    class Auto(TuckerConv2d):
        method = "auto"

    with pytest.raises(TensorcutError) as e:
        register_method(Auto)
    assert str(e.value) == "'auto' is reserved (the planner's choice among methods)"

    class Clash(TuckerConv2d):
        method = "cp"

    with pytest.raises(TensorcutError) as e:
        register_method(Clash)
    assert str(e.value) == "method 'cp' is already registered to CPConv2d; choose another name"
    assert get_method("cp") is CPConv2d
