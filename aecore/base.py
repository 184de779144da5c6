"""What every aecore model is: the protocol the trainer, the CLI and the exporter rely on."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from aecore.kernels._backend import autocasting
from aecore.normalization import Normalization


class AutoEncoderBase(nn.Module):
    """Base of every model family.

    Subclasses set ``family`` (the CLI / registry name), ``input_shape`` (one sample's shape,
    no batch dim) and ``latent_dim``, and implement:

    - ``encode(x) -> z``: (B, *input_shape) -> (B, latent_dim); VAEs return (mu, logvar)
    - ``decode(z) -> x_hat``: (B, latent_dim) -> (B, *input_shape)
    - ``forward(x) -> x_hat``: deterministic reconstruction (the exported ``autoencoder`` part)
    - ``loss(x, y=None, target=None) -> dict``: ``{"loss": scalar, <term>: scalar, ...}``;
      ``target`` (default x) is the clean input the reconstruction is compared with (denoising)
    - ``config() -> dict``: JSON-able constructor kwargs; ``type(self)(**config())`` rebuilds it

    ``normalization`` maps raw data to the model's input space and travels with the model.
    """

    family: ClassVar[str] = ""
    input_shape: tuple[int, ...]
    latent_dim: int
    normalization: Normalization | None = None

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Any:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None,
             target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction, (B, *input_shape) -> (B, *input_shape)."""
        return self(x)

    def reconstruction_error(self, x: torch.Tensor, *condition: torch.Tensor) -> torch.Tensor:
        """Per-sample mean squared reconstruction error, (B, *input_shape) -> (B,).

        ``condition``: the labels of conditional models."""
        err = (self(x, *condition) - x).pow(2)
        return err.flatten(1).mean(dim=1)

    def check_input(self, x: torch.Tensor, arg: str = "x") -> None:
        """ValueError/TypeError naming ``arg`` unless x is a floating (B, *input_shape) batch."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{arg} must be a floating point tensor, got {x.dtype}")
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(
                f"{arg} must have shape (batch, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )

    def check_code(self, z: torch.Tensor, arg: str = "z") -> None:
        """ValueError/TypeError naming ``arg`` unless z is a floating (B, latent_dim) batch."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"{arg} must have shape (batch, {self.latent_dim}), "
                             f"got {tuple(z.shape)}")
        self.check_dtype(z, arg)

    def check_dtype(self, t: torch.Tensor, arg: str = "x") -> None:
        """TypeError naming ``arg`` unless t has the dtype of the model's parameters (what the
        layers compute in; helpers such as :func:`aecore.search.embed` cast instead). Under
        autocast any floating dtype passes: the layers cast to autocast's."""
        if autocasting(t) is not None:
            return
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), t.dtype)
        if t.dtype != dtype:
            raise TypeError(f"{arg} must have the model's dtype {dtype}, got {t.dtype}: cast "
                            f"it (or the model, with model.to({t.dtype}))")

    def check_loss_inputs(self, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """``target`` (x when None) after checking that x is a nonempty batch (a loss is a mean
        over its samples: an empty one would be NaN) and target a floating batch of x's shape
        (a mismatched one would broadcast against the reconstruction and give a wrong loss)."""
        self.check_input(x)
        if x.shape[0] == 0:
            raise ValueError(f"x must hold at least one sample to take a loss over, "
                             f"got shape {tuple(x.shape)}")
        if target is None:
            return x
        self.check_input(target, "target")
        if target.shape != x.shape:
            raise ValueError(f"target must have the shape of x {tuple(x.shape)}, "
                             f"got {tuple(target.shape)}")
        return target
