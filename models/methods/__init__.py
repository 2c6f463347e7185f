"""The registry of self-supervised methods."""

from __future__ import annotations

from models.methods.base import Method, Progress
from models.methods.swav import SwAV

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (SwAV,)}


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def create_method(name: str, **kwargs) -> Method:
    return method_class(name)(**kwargs)


__all__ = ["METHODS", "Method", "Progress", "create_method", "method_class"]
