"""PNG figures: image grids, loss curves, 2-D latent spaces. Every file is written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aecore.checks import positive_int  # noqa: E402
from aecore.io import atomic_write  # noqa: E402


def _save(fig, path: str | os.PathLike) -> None:
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100,
                                                   bbox_inches="tight"))
    finally:  # a failed write must not leave the figure open in pyplot's registry
        plt.close(fig)


def _check_png(path: str | os.PathLike) -> None:
    # Figures are written as PNG: any other suffix would name the bytes wrongly.
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"path must be a .png file path, got {str(path)!r}")


def _as_hw_or_hwc(img: np.ndarray) -> np.ndarray:
    """One image (H, W) or (C, H, W) -> (H, W) grey or (H, W, 3) colour; channel counts
    other than 1 and 3 are shown as their mean, in grey."""
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 3:
        img = np.moveaxis(img, 0, -1) if img.shape[0] == 3 else img.mean(axis=0)
    return np.clip(img, 0.0, 1.0)


def save_image_grid(images: np.ndarray, path: str | os.PathLike, nrow: int = 8,
                    titles: Sequence[str] | None = None, row_labels: Sequence[str] | None = None
                    ) -> None:
    """Write images (N, H, W) or (N, C, H, W), floats in [0, 1], as a PNG grid of ``nrow`` columns.

    ``row_labels`` names each row (e.g. "original", "reconstruction"). Images of other than 1
    or 3 channels are drawn as their channel mean."""
    _check_png(path)
    images = np.asarray(images)
    if images.ndim not in (3, 4) or len(images) == 0:
        raise ValueError(f"images must be (N, H, W) or (N, C, H, W), N >= 1; got {images.shape}")
    nrow = positive_int("nrow", nrow)
    n = len(images)
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    fig, axes = plt.subplots(nrows, ncol, figsize=(ncol * 1.1, nrows * 1.15), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if i < n:
            ax.imshow(_as_hw_or_hwc(images[i]), cmap="gray", vmin=0.0, vmax=1.0)
            if titles is not None and i < len(titles):
                ax.set_title(titles[i], fontsize=7)
    if row_labels is not None:
        for r, label in enumerate(row_labels[:nrows]):
            axes[r, 0].set_ylabel(label, fontsize=8)
    _save(fig, path)


def plot_history(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Loss curves (train_loss, val_loss and any other per-epoch terms) against epoch."""
    _check_png(path)
    if not history:
        raise ValueError("history is empty: nothing to plot")
    epochs = [h["epoch"] for h in history]
    keys = [k for k in history[0] if k.startswith(("train_", "val_")) and k != "train_time"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in keys:
        vals = [h.get(k) for h in history]
        if all(isinstance(v, (int, float)) for v in vals):
            ax.plot(epochs, vals, marker="o", markersize=3, label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log" if all(
        isinstance(h.get("train_loss"), (int, float)) and h["train_loss"] > 0 for h in history
    ) else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_latent_2d(z: np.ndarray, path: str | os.PathLike, color: np.ndarray | None = None,
                   title: str = "latent space") -> None:
    """Scatter of 2-D codes z (N, 2), coloured by ``color`` (labels or a continuous value)."""
    _check_png(path)
    z = np.asarray(z)
    if z.ndim != 2 or z.shape[1] != 2:
        raise ValueError(f"z must have shape (N, 2) to plot a 2-D latent space, got {z.shape}")
    fig, ax = plt.subplots(figsize=(5, 5))
    sc = ax.scatter(z[:, 0], z[:, 1], c=color, s=4, cmap="viridis")
    ax.set_aspect("equal", adjustable="datalim")  # distances in the plot are distances in z
    if color is not None:
        fig.colorbar(sc, ax=ax)
    ax.set_title(title)
    _save(fig, path)
