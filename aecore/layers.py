"""Layers built on aecore's fused kernels."""

from __future__ import annotations

import torch
from torch import nn

from aecore.kernels._activations import activation_id
from aecore.kernels._backend import check_slope
from aecore.kernels.fused_linear import fused_linear


class FusedLinear(nn.Linear):
    """``act(x @ weight.T + bias)`` in one fused op: a drop-in for nn.Linear + activation.

    Same parameter names, shapes and initialisation as :class:`torch.nn.Linear`, so
    state_dicts interchange. (..., in_features) -> (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "identity", negative_slope: float = 0.01,
                 device=None, dtype=None):
        activation_id(activation)
        check_slope(negative_slope)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_linear(x, self.weight, self.bias, self.activation,
                            negative_slope=self.negative_slope)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
