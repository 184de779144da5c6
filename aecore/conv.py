"""Convolutional autoencoders for (B, C, H, W) images.

The encoder halves the image ``len(channels)`` times (conv3x3 + activation + 2x2 max-pool per
stage) and ends in a dense layer; the decoder mirrors it with bilinear x2 upsampling + conv3x3
or a stride-2 transposed convolution per stage. The dense layers run on the fused linear op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from aecore.base import AutoEncoderBase
from aecore.checks import positive_int
from aecore.kernels._activations import act_torch, activation_id
from aecore.layers import FusedLinear
from aecore.registry import register

UPSAMPLE = ("bilinear", "transposed")
OUTPUT_ACTIVATIONS = ("sigmoid", "identity")


def _shape(arg: str, shape: object) -> tuple[int, int, int]:
    """``shape`` as a (C, H, W) tuple of positive ints; ValueError naming ``arg`` otherwise."""
    try:
        dims = tuple(int(d) for d in shape)  # type: ignore[union-attr]
        ok = len(dims) == 3 and all(d >= 1 and d == s for d, s in zip(dims, shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{arg} must be (C, H, W) with positive integers, got {shape!r}")
    return dims  # type: ignore[return-value]


def _channels(channels: object) -> tuple[int, ...]:
    try:
        chans = tuple(int(c) for c in channels)  # type: ignore[union-attr]
        ok = len(chans) >= 1 and all(c >= 1 and c == s for c, s in zip(chans, channels))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"channels must be a non-empty sequence of positive integers, "
                         f"got {channels!r}")
    return chans


def _bottom(arg: str, shape: tuple[int, int, int], stages: int) -> tuple[int, int]:
    """(H, W) after ``stages`` halvings; ValueError naming ``arg`` unless they divide exactly."""
    f = 2 ** stages
    _, h, w = shape
    if h % f or w % f:
        raise ValueError(
            f"{arg} {shape}: height and width must be divisible by 2**len(channels) = {f} "
            f"({stages} pooling stages); pad or crop the images, or use fewer channels"
        )
    return h // f, w // f


class ConvEncoder(nn.Module):
    """(B, C, H, W) -> (B, out_dim): per stage conv3x3 + activation + 2x2 max-pool, then dense.

    H and W must be divisible by ``2 ** len(channels)``; the output has no activation.
    """

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (32, 64),
                 out_dim: int = 32, activation: str = "relu"):
        super().__init__()
        self.input_shape = _shape("input_shape", input_shape)
        self.channels = _channels(channels)
        self.out_dim = positive_int("out_dim", out_dim)
        activation_id(activation)
        self.activation = activation
        h, w = _bottom("input_shape", self.input_shape, len(self.channels))
        c_in = self.input_shape[0]
        self.convs = nn.ModuleList()
        for c in self.channels:
            self.convs.append(nn.Conv2d(c_in, c, kernel_size=3, padding=1))
            c_in = c
        self.pool = nn.MaxPool2d(2)
        self.fc = FusedLinear(c_in * h * w, self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = self.pool(act_torch(conv(x), self.activation))
        return self.fc(x.flatten(1))


class ConvDecoder(nn.Module):
    """(B, in_dim) -> (B, C, H, W): dense to the smallest feature map, one x2 stage per channel.

    Each stage is bilinear x2 upsampling + conv3x3 (``upsample="bilinear"``) or a
    ConvTranspose2d with kernel 2, stride 2 (``"transposed"``), followed by the activation; a
    final conv3x3 maps to C channels with no activation.
    """

    def __init__(self, output_shape: Sequence[int], channels: Sequence[int] = (64, 32),
                 in_dim: int = 32, upsample: str = "bilinear", activation: str = "relu"):
        super().__init__()
        self.output_shape = _shape("output_shape", output_shape)
        self.channels = _channels(channels)
        self.in_dim = positive_int("in_dim", in_dim)
        if upsample not in UPSAMPLE:
            raise ValueError(f"upsample must be one of {UPSAMPLE}, got {upsample!r}")
        activation_id(activation)
        self.upsample, self.activation = upsample, activation
        self.bottom = _bottom("output_shape", self.output_shape, len(self.channels))
        h, w = self.bottom
        self.fc = FusedLinear(self.in_dim, self.channels[0] * h * w, activation=activation)
        self.stages = nn.ModuleList()
        c_in = self.channels[0]
        for c in self.channels:
            if upsample == "bilinear":
                stage = nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    nn.Conv2d(c_in, c, kernel_size=3, padding=1),
                )
            else:
                stage = nn.ConvTranspose2d(c_in, c, kernel_size=2, stride=2)
            self.stages.append(stage)
            c_in = c
        self.out = nn.Conv2d(c_in, self.output_shape[0], kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).unflatten(1, (self.channels[0], *self.bottom))
        for stage in self.stages:
            x = act_torch(stage(x), self.activation)
        return self.out(x)


@register
class ConvAutoEncoder(AutoEncoderBase):
    """Convolutional autoencoder: (B, C, H, W) -> (B, C, H, W) through a (B, latent_dim) code.

    The decoder mirrors the encoder (channels reversed). ``output_activation="sigmoid"`` suits
    images scaled to [0, 1].
    """

    family = "conv-ae"

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (32, 64),
                 latent_dim: int = 32, upsample: str = "bilinear", activation: str = "relu",
                 output_activation: str = "sigmoid"):
        super().__init__()
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"output_activation must be one of {OUTPUT_ACTIVATIONS}, "
                             f"got {output_activation!r}")
        latent_dim = positive_int("latent_dim", latent_dim)
        self.encoder = ConvEncoder(input_shape, channels, latent_dim, activation)
        self.decoder = ConvDecoder(input_shape, self.encoder.channels[::-1], latent_dim,
                                   upsample, activation)
        self.input_shape = self.encoder.input_shape
        self.channels = self.encoder.channels
        self.latent_dim = self.encoder.out_dim
        self.upsample, self.activation = upsample, activation
        self.output_activation = output_activation

    def config(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "channels": list(self.channels),
            "latent_dim": self.latent_dim,
            "upsample": self.upsample,
            "activation": self.activation,
            "output_activation": self.output_activation,
        }

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, latent_dim)."""
        self.check_input(x)
        self.check_dtype(x)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, C, H, W)."""
        self.check_code(z)
        return act_torch(self.decoder(z), self.output_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None,
             target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"loss", "mse"}: mean squared error of the reconstruction of x against target."""
        target = self.check_loss_inputs(x, target)
        mse = (self(x) - target).pow(2).mean()
        return {"loss": mse, "mse": mse}
