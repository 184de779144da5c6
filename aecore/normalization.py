"""Normalisation statistics that travel with a trained model: x_model = (x_raw - mean) / std."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Normalization:
    """Affine map from raw data to model inputs.

    ``mean`` and ``std`` are scalars (images: mean 0, std 255 maps bytes to [0, 1]) or one
    value per feature (tabular data).
    """

    mean: float | list[float]
    std: float | list[float]

    def __post_init__(self):
        std = np.asarray(self.std, dtype=np.float64)
        if not np.all(np.isfinite(std)) or np.any(std <= 0):
            raise ValueError("Normalization.std must be finite and positive")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Raw data -> model inputs (float32)."""
        return ((np.asarray(x, np.float32) - np.asarray(self.mean, np.float32))
                / np.asarray(self.std, np.float32)).astype(np.float32)

    def invert(self, x: np.ndarray) -> np.ndarray:
        """Model space -> raw data units (float32)."""
        return (np.asarray(x, np.float32) * np.asarray(self.std, np.float32)
                + np.asarray(self.mean, np.float32)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict | None) -> Normalization | None:
        return None if d is None else cls(mean=d["mean"], std=d["std"])

    @classmethod
    def fit(cls, x: np.ndarray) -> Normalization:
        """Per-feature standardisation of a (N, F) array; constant features keep std 1."""
        x = np.asarray(x, np.float64)
        std = x.std(axis=0)
        std[std < 1e-12] = 1.0
        return cls(mean=x.mean(axis=0).tolist(), std=std.tolist())
