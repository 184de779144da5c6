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
        arrays = {}
        for name in ("mean", "std"):
            try:
                arrays[name] = np.asarray(getattr(self, name), dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"Normalization.{name} must be a number or a list of numbers, "
                                 f"got {getattr(self, name)!r}") from None
        with np.errstate(over="ignore", under="ignore"):  # checked in float32, as applied
            mean, std = (arrays[k].astype(np.float32) for k in ("mean", "std"))
        if not np.all(np.isfinite(std)) or np.any(std <= 0):
            raise ValueError("Normalization.std must be finite and positive")
        if not np.all(np.isfinite(mean)):
            raise ValueError("Normalization.mean must be finite")
        shapes_ok = mean.ndim <= 1 and std.ndim <= 1 and mean.size > 0 and std.size > 0
        try:
            np.broadcast_shapes(mean.shape, std.shape)
        except ValueError:
            shapes_ok = False
        if not shapes_ok:
            raise ValueError(f"Normalization.mean and std must be numbers or per-feature lists of "
                             f"one length, got shapes {mean.shape} and {std.shape}")
        for name in ("mean", "std"):  # plain floats and lists: to_dict goes to JSON as it is
            object.__setattr__(self, name, arrays[name].tolist())

    def check_fits(self, shape, where: str) -> None:
        """ValueError naming ``where`` unless this fits samples of ``shape``: per-feature values
        need flat samples (F,) with one per feature; shaped samples (images) take scalars."""
        shape = tuple(int(d) for d in shape)
        n = max(np.size(self.mean), np.size(self.std))
        if n > 1 and shape != (n,):
            raise ValueError(f"{where}: the normalization holds {n} per-feature values, but the "
                             f"model's samples have shape {shape}")

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
        if d is None:
            return None
        if not isinstance(d, dict) or not {"mean", "std"} <= set(d):
            raise ValueError(f"a saved normalization must be a mapping with 'mean' and 'std', "
                             f"got {d!r}")
        return cls(mean=d["mean"], std=d["std"])

    @classmethod
    def fit(cls, x: np.ndarray) -> Normalization:
        """Per-feature standardisation of a (N, F) array; constant features keep std 1."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"Normalization.fit takes a (N, F) array of N >= 1 samples, got "
                             f"shape {x.shape}")
        std = x.std(axis=0)
        std[std < 1e-12] = 1.0
        return cls(mean=x.mean(axis=0).tolist(), std=std.tolist())
