"""Undercomplete MLP autoencoders, optionally with tied weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from aecore.base import AutoEncoderBase
from aecore.checks import number, positive_int, positive_ints
from aecore.kernels._activations import activation_id
from aecore.kernels.fused_linear import fused_linear
from aecore.layers import FusedLinear
from aecore.registry import register


class _FusedMLP(nn.Module):
    """FusedLinear layers through ``sizes``; hidden layers use ``activation``, the last
    ``last_activation``. ``layers`` holds them, input side first."""

    def __init__(self, sizes: list[int], activation: str, last_activation: str):
        super().__init__()
        acts = [activation] * (len(sizes) - 2) + [last_activation]
        self.layers = nn.ModuleList(
            FusedLinear(a, b, activation=act) for a, b, act in zip(sizes, sizes[1:], acts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Encoder(_FusedMLP):
    """MLP encoder: (B, input_dim) -> (B, latent_dim) through ``hidden_dims``."""

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], latent_dim: int,
                 activation: str = "relu", latent_activation: str = "identity"):
        activation_id(activation)
        activation_id(latent_activation, "latent_activation")
        super().__init__(positive_ints("input_dim, hidden_dims and latent_dim",
                               [input_dim, *hidden_dims, latent_dim]),
                         activation, latent_activation)


class Decoder(_FusedMLP):
    """MLP decoder: (B, latent_dim) -> (B, output_dim); ``hidden_dims`` from the latent side."""

    def __init__(self, latent_dim: int, hidden_dims: Sequence[int], output_dim: int,
                 activation: str = "relu", output_activation: str = "identity"):
        activation_id(activation)
        activation_id(output_activation, "output_activation")
        super().__init__(positive_ints("latent_dim, hidden_dims and output_dim",
                               [latent_dim, *hidden_dims, output_dim]),
                         activation, output_activation)


class TiedDecoder(nn.Module):
    """Decoder that reuses the encoder's weights transposed, with biases of its own."""

    def __init__(self, encoder: Encoder, activation: str = "relu",
                 output_activation: str = "identity"):
        super().__init__()
        # Checked now, not at the first forward: a bad name must not reach config().
        activation_id(activation)
        activation_id(output_activation, "output_activation")
        # A plain list keeps the encoder out of this module's parameters: its weights are
        # owned (and saved) once, by the encoder.
        self._encoder = [encoder]
        layers = list(encoder.layers)[::-1]
        self.biases = nn.ParameterList(
            nn.Parameter(torch.zeros(layer.in_features)) for layer in layers
        )
        self.activations = [activation] * (len(layers) - 1) + [output_activation]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        layers = list(self._encoder[0].layers)[::-1]
        for layer, bias, act in zip(layers, self.biases, self.activations):
            z = fused_linear(z, layer.weight.t(), bias, act)
        return z


@register
class AutoEncoder(AutoEncoderBase):
    """Undercomplete MLP autoencoder; ``tied=True`` decodes with the encoder's weights transposed.

    forward: (B, input_dim) -> (B, input_dim) reconstruction; encode: -> (B, latent_dim).
    """

    family = "ae"

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] = (256,), latent_dim: int = 32,
                 activation: str = "relu", tied: bool = False,
                 output_activation: str = "identity", latent_activation: str = "identity"):
        super().__init__()
        self.hidden_dims = positive_ints("hidden_dims", hidden_dims)
        self.input_shape = (positive_int("input_dim", input_dim),)
        self.latent_dim = positive_int("latent_dim", latent_dim)
        self.activation = activation
        if not isinstance(tied, bool):  # bool("no") would be True
            raise TypeError(f"tied must be a bool, got {type(tied).__name__}")
        self.tied = tied
        self.output_activation = output_activation
        self.latent_activation = latent_activation
        self.encoder = Encoder(input_dim, self.hidden_dims, latent_dim, activation,
                               latent_activation)
        if self.tied:
            self.decoder = TiedDecoder(self.encoder, activation, output_activation)
        else:
            self.decoder = Decoder(latent_dim, self.hidden_dims[::-1], input_dim, activation,
                                   output_activation)

    def config(self) -> dict[str, Any]:
        return {
            "input_dim": self.input_shape[0],
            "hidden_dims": self.hidden_dims,
            "latent_dim": self.latent_dim,
            "activation": self.activation,
            "tied": self.tied,
            "output_activation": self.output_activation,
            "latent_activation": self.latent_activation,
        }

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        self.check_dtype(x)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.check_code(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None,
             target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        target = self.check_loss_inputs(x, target)
        mse = (self(x) - target).pow(2).mean()
        return {"loss": mse, "mse": mse}


class PenalizedAutoEncoder(AutoEncoder):
    """Base of the MLP autoencoders whose loss adds ``lam`` times a penalty of their own;
    ``lam=None`` takes the family's ``default_lam``."""

    default_lam: ClassVar[float] = 1.0

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] = (256,), latent_dim: int = 32,
                 activation: str = "relu", tied: bool = False,
                 output_activation: str = "identity", latent_activation: str = "identity",
                 lam: float | None = None):
        lam = self.default_lam if lam is None else lam
        lam = number("lam", lam)
        super().__init__(input_dim, hidden_dims, latent_dim, activation, tied,
                         output_activation, latent_activation)
        self.lam = lam

    def config(self) -> dict[str, Any]:
        return {**super().config(), "lam": self.lam}
