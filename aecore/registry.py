"""Model families by name: the CLI, checkpoints and the exporter find classes here."""

from __future__ import annotations

from typing import TypeVar

MODELS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    """Class decorator: make ``cls`` (an AutoEncoderBase with a ``family``) loadable by name."""
    name = cls.family
    if not name:
        raise ValueError(f"{cls.__name__}.family must be set to register it")
    if name in MODELS and MODELS[name] is not cls:
        raise ValueError(f"model family {name!r} is registered twice")
    MODELS[name] = cls
    return cls


def model_class(family: str) -> type:
    """The class registered for ``family``; ValueError listing the known ones otherwise."""
    import aecore

    aecore.register_all()
    if family not in MODELS:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(MODELS)}")
    return MODELS[family]
