"""Geometry-regularized autoencoders: codes pulled towards a manifold learner's embedding.

A plain autoencoder's loss does not prefer the unrolled chart of a data manifold to a folded or
torn one that its decoder can invert as well, and on the swiss roll training ends folded (see
the README's swiss-roll table). Following Duque et al., "Geometry Regularized Autoencoders"
(IEEE TPAMI 2022), the encoder is trained to reconstruct *and* to stay close to a precomputed
embedding of the training set (Isomap here: geodesic distances over a k-nearest-neighbour
graph):

    loss = mean ||x - g(f(x))||^2 + lam * mean ||f(x) - e(x)||^2

The model keeps what Isomap lacks: a parametric encoder for new points and a decoder back to
the input space, both plain MLPs (they export like any :class:`AutoEncoder`).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from aecore.autoencoder import PenalizedAutoEncoder
from aecore.checks import positive_int
from aecore.registry import register

# Isomap's shortest paths and eigendecomposition grow as N^2 in memory: larger sets are
# embedded by fitting on a random subset of this many points and mapping the rest through
# Isomap's out-of-sample transform.
MAX_FIT = 5000
_CHUNK = 4096


def manifold_embedding(x: np.ndarray, dim: int, n_neighbors: int = 10, seed: int = 0,
                       max_fit: int = MAX_FIT) -> np.ndarray:
    """Isomap embedding of x (N, F) into (N, dim) float32, centred and scaled to unit overall
    standard deviation (one scale for every axis, so the embedding keeps its shape)."""
    from sklearn.manifold import Isomap

    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (N, F) or (N, ...), got shape {x.shape}")
    x = x.reshape(len(x), -1)
    if not np.isfinite(x).all():
        raise ValueError("x contains NaN or Inf")
    dim = positive_int("dim", dim)
    n_neighbors = positive_int("n_neighbors", n_neighbors)
    # The subset is what Isomap fits: it needs more rows than neighbours and components.
    if isinstance(max_fit, bool) or not isinstance(max_fit, numbers.Integral) \
            or max_fit <= max(n_neighbors, dim):
        raise ValueError(f"max_fit must be an int above max(n_neighbors, dim) = "
                         f"{max(n_neighbors, dim)}, got {max_fit!r}")
    if len(x) <= max(n_neighbors, dim):
        raise ValueError(f"x must have more than max(n_neighbors, dim) = "
                         f"{max(n_neighbors, dim)} rows for an embedding, got {len(x)}")
    # The dense eigensolver: ARPACK (sklearn's choice for few components) starts from a random
    # vector, so the same data and seed would not give the same targets twice.
    iso = Isomap(n_neighbors=n_neighbors, n_components=dim, eigen_solver="dense")
    if len(x) > max_fit:
        fit = np.random.default_rng(seed).choice(len(x), max_fit, replace=False)
        iso.fit(x[fit])
        # transform holds a (rows, max_fit) float64 geodesic matrix: chunks bound its memory.
        e = np.concatenate([iso.transform(x[i:i + _CHUNK]) for i in range(0, len(x), _CHUNK)])
    else:
        e = iso.fit_transform(x)
    e = e - e.mean(axis=0)
    return (e / max(float(e.std()), 1e-12)).astype(np.float32)


@register
class GeometryAutoEncoder(PenalizedAutoEncoder):
    """MLP autoencoder whose codes follow a target embedding: loss = mse + lam * mean
    ||encode(x) - y||^2, with y (B, latent_dim) the targets of the batch (see
    :func:`manifold_embedding`). (B, input_dim) -> (B, input_dim).

    Training needs the targets; in eval mode without them the loss is the reconstruction alone.
    """

    family = "grae"

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None,
             target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        target = self.check_loss_inputs(x, target)
        self.check_dtype(x)
        z = self.encoder(x)
        mse = (self.decoder(z) - target).pow(2).mean()
        if y is None:
            if self.training:
                raise ValueError("GeometryAutoEncoder trains on target embeddings: pass y "
                                 f"(batch, {self.latent_dim}), e.g. "
                                 "aecore.geometry.manifold_embedding(x, latent_dim)")
            return {"loss": mse, "mse": mse}
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            raise TypeError(f"y must be a floating point torch.Tensor, got "
                            f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
        if tuple(y.shape) != tuple(z.shape):
            raise ValueError(f"y must have shape (batch, latent_dim) = {tuple(z.shape)}, "
                             f"got {tuple(y.shape)}")
        geometry = (z - y.to(z.dtype)).pow(2).mean()
        return {"loss": mse + self.lam * geometry, "mse": mse, "geometry": geometry}
