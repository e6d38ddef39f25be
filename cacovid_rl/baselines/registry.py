"""Name -> class registry of the compression methods, filled by each method's module when it is imported.

Kept apart from ``base.py`` and from the methods so there is no import cycle: every method module imports
``base`` and this module, and registers its class with ``@register``; the package ``__init__`` imports every
method module (any ``import cacovid_rl.baselines.<x>`` runs it first), so the registry is complete whenever a
caller can reach it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

_CLASSES: dict[str, type] = {}
C = TypeVar("C", bound=type)


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make ``get_method(name)`` build this class. Names are unique."""

    def deco(cls: C) -> C:
        if name in _CLASSES and _CLASSES[name] is not cls:
            raise ValueError(f"compression method {name!r} registered twice ({_CLASSES[name]} and {cls})")
        _CLASSES[name] = cls
        return cls

    return deco


def registered() -> tuple[str, ...]:
    """Every registered name, in registration order."""
    return tuple(_CLASSES)


def get_method(name: str, **kwargs: Any) -> Any:
    """A fresh method by name; ``kwargs`` go to its constructor (e.g. ``imp_ratio`` for ``cacovid``)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown selector {name!r}; available: {list(_CLASSES)}")
    return _CLASSES[name](**kwargs)


get_selector = get_method
"""The historical name: every method, selecting or merging, is built the same way."""
