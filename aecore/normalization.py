"""Normalisation statistics that travel with a trained model: x_model = (x_raw - mean) / std."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Normalization:
    """Affine map from raw data to model inputs.

    ``mean`` and ``std`` are scalars (images: mean 0, std 255 maps bytes to [0, 1]) or one
    value per feature (tabular data). ``constant`` lists the features that never varied in the
    data the statistics were fit on (their std is 1, a stand-in): :meth:`invert` maps them back
    to their mean, since a model trained on such data learnt nothing about them.
    """

    mean: float | list[float]
    std: float | list[float]
    constant: list[int] = ()

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
        n = max(mean.size, std.size)
        cols = self.constant
        if (isinstance(cols, (str, bytes)) or not hasattr(cols, "__iter__")
                or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                           and 0 <= c < n for c in cols)
                or (len(cols) and n == 1)):
            raise ValueError(f"Normalization.constant must list feature indices in [0, {n}) of "
                             f"per-feature statistics, got {cols!r}")
        object.__setattr__(self, "constant", sorted({int(c) for c in cols}))

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
        """Model space -> raw data units (float32); constant features come back as their
        mean."""
        return (np.asarray(x, np.float32) * self.invert_scale()
                + np.asarray(self.mean, np.float32)).astype(np.float32)

    def invert_scale(self) -> np.ndarray:
        """The std that :meth:`invert` multiplies by: float32, 0 for constant features."""
        scale = np.array(self.std, np.float32)
        if self.constant:
            shape = np.broadcast_shapes(np.shape(self.mean), scale.shape)
            scale = np.broadcast_to(scale, shape).copy()
            scale[self.constant] = 0.0
        return scale

    def to_dict(self) -> dict:
        d = {"mean": self.mean, "std": self.std}
        return {**d, "constant": self.constant} if self.constant else d

    @classmethod
    def from_dict(cls, d: dict | None) -> Normalization | None:
        if d is None:
            return None
        if not isinstance(d, dict) or not {"mean", "std"} <= set(d):
            raise ValueError(f"a saved normalization must be a mapping with 'mean' and 'std', "
                             f"got {d!r}")
        return cls(mean=d["mean"], std=d["std"], constant=d.get("constant", ()))

    @classmethod
    def fit(cls, x: np.ndarray) -> Normalization:
        """Per-feature standardisation of a (N, F) array; constant features keep std 1 and are
        listed in ``constant``."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"Normalization.fit takes a (N, F) array of N >= 1 samples, got "
                             f"shape {x.shape}")
        std = x.std(axis=0)
        constant = np.flatnonzero(std < 1e-12)
        std[constant] = 1.0
        return cls(mean=x.mean(axis=0).tolist(), std=std.tolist(), constant=constant.tolist())
