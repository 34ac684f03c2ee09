"""The method registry: name -> factorized layer class (``register_method`` / ``get_method`` /
``list_methods``), in the style of timm's model registry.

A method is one file under ``tensorcut/layers/``: a :class:`~tensorcut.layers.base.FactorizedConv2d`
subclass with a ``method`` name and its typed ``Options``, decorated with :func:`register_method`.
Nothing outside ``layers/`` names a method; the planner, the cost model, save/load, export and the
CLI read everything they need from the class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from tensorcut.errors import TensorcutError

if TYPE_CHECKING:
    from torch import nn

    from tensorcut.layers.base import FactorizedConv2d

#: name -> layer class, filled by :func:`register_method` when ``tensorcut.layers`` is imported.
LAYER_REGISTRY: dict[str, type[FactorizedConv2d]] = {}

#: name -> factorized layer class that replaces something other than a conv (e.g. ``SVDLinear``):
#: rebuilt from checkpoints by name, never planned, so not a ``--method`` choice.
OTHER_LAYERS: dict[str, type[nn.Module]] = {}

_M = TypeVar("_M", bound="type[nn.Module]")


def register_method(cls: type[FactorizedConv2d]) -> type[FactorizedConv2d]:
    """Class decorator: make a factorized layer available by its ``method`` name.

    Args:
        cls: a concrete :class:`~tensorcut.layers.base.FactorizedConv2d` subclass whose
            ``method`` class attribute is a new, non-empty name.

    Returns:
        ``cls`` unchanged (so it can be used as a decorator).

    Raises:
        TensorcutError: when ``method`` is empty or already registered to another class.

    Example:
        >>> from tensorcut.layers import TuckerConv2d, register_method
        >>> @register_method
        ... class MyTucker(TuckerConv2d):
        ...     method = "my-tucker"  # doctest: +SKIP
    """
    name = getattr(cls, "method", "")
    if not name or not isinstance(name, str):
        raise TensorcutError(f"{cls.__name__} has no method name; set `method = '<name>'`")
    if name == "auto":
        raise TensorcutError("'auto' is reserved (the planner's choice among methods)")
    old = LAYER_REGISTRY.get(name)
    if old is not None and old is not cls and old.__qualname__ != cls.__qualname__:
        raise TensorcutError(
            f"method {name!r} is already registered to {old.__name__}; choose another name"
        )
    LAYER_REGISTRY[name] = cls
    return cls


def register_layer(cls: _M) -> _M:
    """Class decorator: make a non-conv factorized layer rebuildable from checkpoints by its
    ``method`` name (not a planner method; see :func:`register_method` for those).

    Args:
        cls: an ``nn.Module`` subclass with a ``method`` class attribute and the
            ``from_config``/``config`` pair that save/load uses.

    Returns:
        ``cls`` unchanged.

    Raises:
        TensorcutError: when ``method`` is empty or already taken by a conv method.

    Example:
        >>> from tensorcut.layers import layer_class
        >>> layer_class("svd").__name__
        'SVDLinear'
    """
    name = getattr(cls, "method", "")
    if not name or not isinstance(name, str):
        raise TensorcutError(f"{cls.__name__} has no method name; set `method = '<name>'`")
    if name in LAYER_REGISTRY:
        raise TensorcutError(f"{name!r} is a conv method already; choose another name")
    OTHER_LAYERS[name] = cls
    return cls


def layer_class(name: str) -> type[nn.Module] | None:
    """The class a checkpoint's recorded ``method`` name rebuilds (a conv method or another
    registered layer such as ``svd``), or ``None`` for an unknown name."""
    _load_builtin()
    return LAYER_REGISTRY.get(name) or OTHER_LAYERS.get(name)


def _load_builtin() -> None:
    import tensorcut.layers  # noqa: F401  (registers the built-in methods)


def list_methods(*, auto: bool = False) -> list[str]:
    """Names of the registered methods, sorted.

    Args:
        auto: only the methods ``method='auto'`` chooses among (those with ``in_auto``).

    Returns:
        The method names, e.g. ``['cp', 'tr', 'tt', 'tucker', 'tucker2']``.

    Raises:
        Nothing of its own; a registered method module that fails to import raises its own error.

    Example:
        >>> import tensorcut
        >>> "tucker2" in tensorcut.list_methods()
        True
    """
    _load_builtin()
    return sorted(n for n, c in LAYER_REGISTRY.items() if c.in_auto or not auto)


def get_method(name: str) -> type[FactorizedConv2d]:
    """The layer class registered as ``name``.

    Args:
        name: a method name from :func:`list_methods`.

    Returns:
        The :class:`~tensorcut.layers.base.FactorizedConv2d` subclass.

    Raises:
        TensorcutError: for an unknown name, listing the registered ones.

    Example:
        >>> from tensorcut.layers import get_method
        >>> get_method("tucker2").__name__
        'TuckerConv2d'
    """
    _load_builtin()
    cls = LAYER_REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise TensorcutError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(LAYER_REGISTRY))}"
        )
    return cls
