"""Argument checks shared by the models and their helpers."""

from __future__ import annotations

import numbers


def positive_int(name: str, value: object) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer >= 1 (a bool
    or an integral float, such as 4.0, is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
