"""``aecore quickstart``: train an undercomplete autoencoder on real images, compare it with PCA
(the linear baseline at the same code size), draw originals against reconstructions, and search
the training images by latent similarity."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from aecore import data as datasets
from aecore.families import Sizes, build
from aecore.io import check_model_dir, check_output_dir, save_model
from aecore.plots import plot_history, save_image_grid
from aecore.search import LatentIndex, embed, precision_at_k
from aecore.train import Trainer


def fit_pca(train: np.ndarray, components: int, seed: int = 0):
    """scikit-learn's PCA with ``components`` components fitted on ``train`` (N, F)."""
    from sklearn.decomposition import PCA

    return PCA(n_components=components, svd_solver="randomized", random_state=seed).fit(train)


def pca_mse(train: np.ndarray, test: np.ndarray, components: int, seed: int = 0, pca=None
            ) -> float:
    """Test reconstruction MSE of PCA fitted on ``train`` with ``components`` components
    (``pca``: that fit, if already made)."""
    pca = fit_pca(train, components, seed) if pca is None else pca
    recon = pca.inverse_transform(pca.transform(test))
    return float(np.mean((recon - test) ** 2))


def run(out: str | Path = "runs/quickstart", epochs: int | None = None, latent: int = 32,
        seed: int = 0, data_root: str | None = None, progress: bool = True) -> dict:
    """Train, evaluate and plot; returns the numbers it printed."""
    t0 = time.perf_counter()
    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs must be a positive integer, got {epochs}")
    out = Path(out)
    # Before training, not after.
    check_model_dir(out / "model", "--out")
    check_output_dir(out, "--out", ("reconstructions.png", "search.png", "loss.png"))
    torch.manual_seed(seed)
    if (datasets.fashion_mnist_named(data_root) is not None
            or datasets.find_fashion_mnist() is not None):
        # A folder the user named (--data-root, $AECORE_FASHION_MNIST) must hold the data: no
        # quiet fallback from it.
        data = datasets.load_fashion_mnist(data_root)
        epochs = 15 if epochs is None else epochs
    else:
        print("Fashion-MNIST not found (sudo apt-get install dataset-fashion-mnist); "
              "using scikit-learn's digits instead.")
        data = datasets.load_digits(seed=seed)
        epochs = 150 if epochs is None else epochs
    hidden = [512, 128] if data.input_dim >= 512 else [48]
    latent = min(latent, data.input_dim // 2)
    model = build("ae", data, Sizes(hidden=hidden, latent=latent))
    x_train, x_test = data.inputs("train"), data.inputs("test")
    print(f"data: {data.name}, {len(x_train)} train / {len(x_test)} test samples of "
          f"{data.sample_shape}; model: {data.input_dim}-{'-'.join(map(str, hidden))}-{latent} "
          f"autoencoder, {epochs} epochs")
    trainer = Trainer(model, lr=2e-3, batch_size=256, epochs=epochs, seed=seed, progress=progress)
    history = trainer.fit(x_train)

    device = next(model.parameters()).device  # where the Trainer put it (CUDA if available)
    with torch.no_grad():
        recon = model(torch.from_numpy(x_test).to(device)).cpu().numpy()
    ae_mse = float(np.mean((recon - x_test) ** 2))
    pca = fit_pca(x_train, latent, seed)
    base_mse = pca_mse(x_train, x_test, latent, pca=pca)
    print(f"test reconstruction MSE  autoencoder: {ae_mse:.5f}   PCA ({latent} components): "
          f"{base_mse:.5f}   ratio AE/PCA: {ae_mse / base_mse:.3f}")

    # Image search: the 10 training images whose codes are nearest (cosine) to each test image's.
    y_train, y_test = data.labels("train"), data.labels("test")
    _, nn = LatentIndex.from_model(model, x_train).search(embed(model, x_test), 10)
    ae_prec = precision_at_k(y_train[nn.numpy()], y_test)
    _, pca_nn = LatentIndex(pca.transform(x_train)).search(pca.transform(x_test), 10)
    pca_prec = precision_at_k(y_train[pca_nn.numpy()], y_test)
    print(f"image search, precision@10 (neighbours of the query's class)  autoencoder codes: "
          f"{ae_prec:.3f}   PCA codes: {pca_prec:.3f}")

    # The data root too: search and export rebuild the split from the config.
    save_model(model, out / "model", history,
               extra={"data": data.name, "seed": seed,
                      # Absolute, as aecore train saves it: later commands run from anywhere.
                      "data_root": None if data_root is None else str(Path(data_root).resolve())})
    n = 10
    grid = np.concatenate([x_test[:n], np.clip(recon[:n], 0, 1)]).reshape(2 * n, *data.sample_shape)
    save_image_grid(grid, out / "reconstructions.png", nrow=n,
                    row_labels=["original", "reconstruction"])
    rows = 5
    found = np.concatenate([np.concatenate([x_test[r:r + 1], x_train[nn[r, :8].numpy()]])
                            for r in range(rows)])
    save_image_grid(found.reshape(-1, *data.sample_shape), out / "search.png", nrow=9,
                    row_labels=[f"query {r}" for r in range(rows)])
    plot_history(history, out / "loss.png")
    elapsed = time.perf_counter() - t0
    print(f"wrote {out / 'model'} (weights, config, history), {out / 'reconstructions.png'}, "
          f"{out / 'search.png'}, {out / 'loss.png'}  [{elapsed:.0f}s]")
    return {"data": data.name, "ae_mse": ae_mse, "pca_mse": base_mse,
            "ae_precision_at_10": ae_prec, "pca_precision_at_10": pca_prec, "epochs": epochs,
            "seconds": elapsed}
