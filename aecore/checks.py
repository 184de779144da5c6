"""Argument checks shared by the models and their helpers."""

from __future__ import annotations

import numbers
from collections.abc import Sequence


def positive_int(name: str, value: object) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer >= 1 (a bool
    or an integral float, such as 4.0, is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_ints(name: str, dims: Sequence[int]) -> list[int]:
    """``dims`` as a list of ints; TypeError naming ``name`` unless it is iterable, ValueError
    unless every entry is an integer >= 1."""
    # int() alone would truncate 4.5 to 4 and build a model of another size.
    if not hasattr(dims, "__iter__"):
        raise TypeError(f"{name} must be a list of positive integers, got {dims!r}")
    dims = list(dims)
    try:
        ints = [int(d) for d in dims]
        # Integers only, as positive_int takes them: not 4.0.
        ok = all(i >= 1 and isinstance(d, numbers.Integral) and not isinstance(d, bool)
                 for i, d in zip(ints, dims))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be positive integers, got {list(dims)!r}")
    return ints
