"""Sparse autoencoders: an MLP autoencoder whose code is pushed to be sparse.

- ``sparsity="kl"``: the code layer is sigmoid and the penalty is sum_j KL(rho || rho_hat_j),
  rho_hat_j the batch mean of unit j (the fused :func:`aecore.kernels.sparsity.kl_sparsity`);
- ``sparsity="l1"``: the penalty is the batch mean of the code's L1 norm.

The code may be wider than the input (over-complete): sparsity, not the bottleneck, keeps the
model from copying its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aecore.autoencoder import AutoEncoder
from aecore.checks import number
from aecore.kernels.sparsity import kl_sparsity
from aecore.registry import register

SPARSITY = ("kl", "l1")
# Default penalty weights: tuned on 8x8 digits so the code reaches its target (KL) or sheds
# ~90% of its L1 norm (L1) while the reconstruction error stays under half the pixel variance.
DEFAULT_WEIGHT = {"kl": 3e-3, "l1": 1e-3}


def l1_sparsity(h: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the L1 norm of each code: (B, H) -> scalar."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
    if h.dim() != 2:
        raise ValueError(f"h must be a 2-D tensor (batch, hidden), got shape {tuple(h.shape)}")
    return h.abs().sum(dim=1).mean()


@register
class SparseAutoEncoder(AutoEncoder):
    """MLP autoencoder with a sparsity penalty on its (B, latent_dim) code.

    loss = mse + weight * sparsity, weight defaulting to DEFAULT_WEIGHT[sparsity]. ``rho`` is
    the target mean activation of each code unit (KL only). The code activation defaults to
    sigmoid for "kl" (required) and relu for "l1".
    """

    family = "sparse-ae"

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] = (256,), latent_dim: int = 64,
                 activation: str = "relu", tied: bool = False,
                 output_activation: str = "identity", latent_activation: str | None = None,
                 sparsity: str = "kl", weight: float | None = None, rho: float = 0.05):
        if sparsity not in SPARSITY:
            raise ValueError(f"sparsity must be one of {SPARSITY}, got {sparsity!r}")
        if latent_activation is None:
            latent_activation = "sigmoid" if sparsity == "kl" else "relu"
        if sparsity == "kl" and latent_activation != "sigmoid":
            raise ValueError(f"latent_activation must be 'sigmoid' with sparsity='kl' (the KL "
                             f"penalty reads code units as firing rates), "
                             f"got {latent_activation!r}")
        if weight is None:
            weight = DEFAULT_WEIGHT[sparsity]
        weight = number("weight", weight)
        rho = number("rho", rho, 0.0, 1.0, lo_open=True)
        super().__init__(input_dim, hidden_dims, latent_dim, activation, tied,
                         output_activation, latent_activation)
        self.sparsity, self.weight, self.rho = sparsity, weight, rho

    def config(self) -> dict[str, Any]:
        return {**super().config(), "sparsity": self.sparsity, "weight": self.weight,
                "rho": self.rho}

    def sparsity_penalty(self, h: torch.Tensor) -> torch.Tensor:
        """The unweighted penalty of codes h (B, latent_dim) -> scalar."""
        if self.sparsity == "kl":
            return kl_sparsity(h, self.rho)
        return l1_sparsity(h)

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None,
             target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"loss": mse + weight * sparsity, "mse", "sparsity"}; mse is against target (or x)."""
        target = self.check_loss_inputs(x, target)
        h = self.encode(x)
        mse = (self.decode(h) - target).pow(2).mean()
        penalty = self.sparsity_penalty(h)
        return {"loss": mse + self.weight * penalty.to(mse.dtype), "mse": mse,
                "sparsity": penalty}
