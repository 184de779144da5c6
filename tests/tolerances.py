"""One place for test tolerances: by dtype, scaled by the reduction length."""

from __future__ import annotations

import math

import torch

# Unit roundoff of the dtype a result is stored in.
_EPS = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def tolerances(dtype: torch.dtype, k: int = 1) -> tuple[float, float]:
    """(rtol, atol) for a result of ``dtype`` made from reductions of length ``k``.

    Storage rounding costs one unit roundoff; fp32 accumulation over k terms grows like
    sqrt(k) unit roundoffs of fp32 (random-walk rounding), times a safety factor of 8.
    """
    if dtype not in _EPS:
        raise ValueError(f"no tolerance for {dtype}")
    acc = 8 * _EPS[torch.float32 if dtype != torch.float64 else torch.float64] * math.sqrt(k)
    rtol = 2 * _EPS[dtype] + acc
    atol = 2 * _EPS[dtype] + acc
    return rtol, atol


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 k: int = 1, scale: float = 1.0) -> None:
    """Compare against a float64 oracle; ``scale`` is the magnitude that atol is relative to."""
    dtype = dtype or actual.dtype
    rtol, atol = tolerances(dtype, k)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)
