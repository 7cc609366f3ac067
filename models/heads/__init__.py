"""Pluggable heads (``vstream.models.heads``): components from the project's source
papers that attach to the model layer, chosen by name.

    @register_head("visual_experts")
    class VisualExperts(Head): ...

    head = create_head("visual_experts", model=lm, **config)
    list_heads()

A head is one file in this folder that registers itself; ``create_head`` imports the
head modules on first use. An unknown name raises ``ConfigError`` listing the known
ones. The frame-encoder head (big.LITTLE) registers with ``vstream.encoders`` instead,
since it is a frame encoder.
"""

from __future__ import annotations

import importlib
import pkgutil

from vstream.errors import ConfigError

_HEADS: dict[str, type] = {}


class Head:
    """Base of every head: ``name`` (the registry name) and ``config`` (its config
    dataclass, or None)."""

    name = ""

    def __init__(self, config=None):
        self.config = config


def register_head(name: str):
    """Class decorator: make a head creatable by ``create_head(name)``."""

    def register(cls):
        cls.name = name
        _HEADS[name] = cls
        return cls

    return register


def _load_heads() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def list_heads() -> list[str]:
    """Names of the registered heads."""
    _load_heads()
    return sorted(_HEADS)


def create_head(name: str, *args, **kwargs) -> Head:
    """A new head of kind ``name``; the arguments go to its constructor."""
    _load_heads()
    if name not in _HEADS:
        raise ConfigError(f"unknown head {name!r}; known: {', '.join(sorted(_HEADS)) or '(none)'}")
    return _HEADS[name](*args, **kwargs)
