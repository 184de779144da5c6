"""Argument checks shared by the models and their helpers (importing no torch)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np


def native_order(a):
    """A numpy array in this machine's byte order (a big-endian one converted: torch takes no
    other); anything else as it is."""
    if isinstance(a, np.ndarray) and not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


def positive_int(name: str, value: object) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer >= 1 (a bool
    or an integral float, such as 4.0, is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def number(name: str, value: object, lo: float = 0.0, hi: float = math.inf,
           lo_open: bool = False, hi_open: bool = True) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is a finite real number
    (numpy scalars too; not a bool or a tensor) in the interval from ``lo`` to ``hi``, each
    end open or closed as given. By default: finite and >= 0."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(value)
          and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi))
    if not ok:
        if hi == math.inf and lo == 0:
            want = "a positive finite number" if lo_open else "a finite number >= 0"
        else:
            want = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return float(value)


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


def check_generator(generator: object) -> None:
    """TypeError unless ``generator`` is a torch.Generator or None."""
    import torch  # here, not above: the numpy-only modules (plots) import this file too

    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
