"""aecore beside its peers on Fashion-MNIST: Pythae (VAE) and PyOD (autoencoder outlier detector).

    pip install -e '.[peers]'
    python bench/peers.py --out runs/peers [--epochs 10] [--ad-epochs 10]

VAE: the same 784-512-256-32 MLP VAE with a Bernoulli likelihood (binary cross-entropy summed
over pixels, KL to N(0, I)), Adam lr 1e-3, batch 128, the same epochs, seed and batch order,
trained once with aecore and once with Pythae's ``VAE`` (its own loss and reparameterization,
with encoder and decoder of the same layers). Pythae's trainer writes pickled checkpoints, so
both models train in the same plain loop here. Both are scored by one function on the same
10000 test images with the same noise: the ELBO in nats per image (higher is better). Training
and generation (decoding prior samples) speeds are images per second of wall time.

Outlier detection: one class of Fashion-MNIST is "normal". Each detector fits on that class's
training images and scores the whole test set (the class's images are inliers, every other
class's are outliers); ROC-AUC of the scores, averaged over the ten classes, and the fit time.
aecore: an ``AutoEncoder`` 784-512-128-32 scored by reconstruction error. PyOD: its
``AutoEncoder`` with the same hidden layers, epochs, batch, learning rate and Adam without
weight decay, no batch norm and no dropout. What PyOD does not let us match: it standardizes
each pixel (its default, kept), puts a ReLU on the 32-unit code, has a linear output layer,
drops the last incomplete batch, and its fit also scores the training set.

Writes ``peers.json``, ``peers.md`` and one PNG grid of 64 prior samples per VAE to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aecore import data
from aecore.autoencoder import AutoEncoder
from aecore.io import write_bytes, write_json
from aecore.plots import save_image_grid
from aecore.train import Trainer
from aecore.vae import VAE

HIDDEN, LATENT = [512, 256], 32


def pythae_vae(seed: int):
    """Pythae's VAE with an MLP encoder and decoder of aecore's VAE's layer sizes."""
    from pythae.models import VAE as PVAE
    from pythae.models import VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    def mlp(sizes):
        layers = []
        for i, o in zip(sizes, sizes[1:]):
            layers += [torch.nn.Linear(i, o), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers)

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.body = mlp([784, *HIDDEN])
            self.mu = torch.nn.Linear(HIDDEN[-1], LATENT)
            self.logvar = torch.nn.Linear(HIDDEN[-1], LATENT)

        def forward(self, x):
            h = self.body(x.reshape(len(x), -1))
            return ModelOutput(embedding=self.mu(h), log_covariance=self.logvar(h))

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.body = mlp([LATENT, *HIDDEN[::-1]])
            self.out = torch.nn.Linear(HIDDEN[0], 784)

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.out(self.body(z))))

    torch.manual_seed(seed)
    config = VAEConfig(input_dim=(784,), latent_dim=LATENT, reconstruction_loss="bce")
    return PVAE(config, encoder=Encoder(), decoder=Decoder())


def train_vae(loss_fn, params, x: torch.Tensor, epochs: int, seed: int) -> float:
    """Adam over shuffled batches of 128; returns the wall seconds of the loop."""
    opt = torch.optim.Adam(params, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            loss = loss_fn(x[order[i:i + 128]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


@torch.no_grad()
def elbo(encode, decode, x: torch.Tensor, seed: int) -> float:
    """Mean over x of log p(x|z) - KL(q(z|x) || N(0, I)), one z ~ q(z|x) per image, Bernoulli
    likelihood; the same noise for every model."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, len(x), 1000):
        xb = x[i:i + 1000]
        mu, logvar = encode(xb)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
        p = decode(z).reshape(len(xb), -1).clamp(1e-7, 1 - 1e-7)
        log_px = -F.binary_cross_entropy(p, xb, reduction="none").sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        total += float((log_px - kl).sum())
    return total / len(x)


@torch.no_grad()
def generation_rate(decode, n: int = 10000) -> tuple[float, np.ndarray]:
    """Prior samples decoded per second (batches of 1000), and the first 64 images."""
    z = torch.randn(n, LATENT, generator=torch.Generator().manual_seed(0))
    decode(z[:1000])  # warm-up
    t0 = time.perf_counter()
    out = [decode(z[i:i + 1000]) for i in range(0, n, 1000)]
    rate = n / (time.perf_counter() - t0)
    return rate, out[0][:64].reshape(64, 28, 28).numpy()


def compare_vaes(x_train, x_test, epochs: int, seed: int, out: Path) -> dict:
    torch.manual_seed(seed)
    ours = VAE(784, HIDDEN, LATENT, likelihood="bernoulli")
    ours_s = train_vae(lambda xb: ours.loss(xb)["loss"], ours.parameters(), x_train, epochs, seed)
    ours.eval()
    theirs = pythae_vae(seed)
    theirs_s = train_vae(lambda xb: theirs({"data": xb}).loss, theirs.parameters(), x_train,
                         epochs, seed)
    theirs.eval()

    def their_encode(xb):
        e = theirs.encoder(xb)
        return e.embedding, e.log_covariance

    rows = {}
    for name, enc, dec, secs in (
        ("aecore", ours.encode, ours.decode, ours_s),
        ("pythae", their_encode, lambda z: theirs.decoder(z).reconstruction, theirs_s),
    ):
        rate, imgs = generation_rate(dec)
        save_image_grid(imgs, out / f"{name}_vae_samples.png")
        rows[name] = {"test_elbo": round(elbo(enc, dec, x_test, seed + 1), 2),
                      "train_s": round(secs, 1),
                      "train_images_per_s": round(epochs * len(x_train) / secs),
                      "generated_images_per_s": round(rate)}
    return rows


def compare_detectors(ds, epochs: int, seed: int) -> dict:
    from pyod.models.auto_encoder import AutoEncoder as PyODAutoEncoder
    from sklearn.metrics import roc_auc_score

    x_train, y_train = ds.inputs("train"), ds.labels("train")
    x_test, y_test = ds.inputs("test"), ds.labels("test")
    per_class = {"aecore": [], "pyod": []}
    fit_s = {"aecore": 0.0, "pyod": 0.0}
    for cls in range(10):
        inliers = x_train[y_train == cls]
        outlier = (y_test != cls).astype(int)
        torch.manual_seed(seed)
        model = AutoEncoder(784, [512, 128], 32, output_activation="sigmoid")
        t0 = time.perf_counter()
        Trainer(model, lr=1e-3, batch_size=128, epochs=epochs, val_fraction=0.0, seed=seed,
                progress=False).fit(inliers)
        fit_s["aecore"] += time.perf_counter() - t0
        with torch.no_grad():
            score = model.reconstruction_error(torch.from_numpy(x_test)).numpy()
        per_class["aecore"].append(roc_auc_score(outlier, score))

        detector = PyODAutoEncoder(hidden_neuron_list=[512, 128, 32], epoch_num=epochs,
                                   batch_size=128, lr=1e-3, batch_norm=False, dropout_rate=0.0,
                                   optimizer_params={"weight_decay": 0.0}, random_state=seed,
                                   verbose=0, device="cpu")
        t0 = time.perf_counter()
        detector.fit(inliers)
        fit_s["pyod"] += time.perf_counter() - t0
        per_class["pyod"].append(roc_auc_score(outlier, detector.decision_function(x_test)))
    return {name: {"mean_roc_auc": round(float(np.mean(aucs)), 4),
                   "roc_auc_per_class": [round(float(a), 4) for a in aucs],
                   "fit_s_all_classes": round(fit_s[name], 1)}
            for name, aucs in per_class.items()}


def markdown(result: dict) -> str:
    v, d = result["vae"], result["outliers"]
    lines = [f"VAE 784-512-256-32, Bernoulli likelihood, {result['epochs']} epochs on the 60000 "
             "Fashion-MNIST training images; ELBO on the 10000 test images (one shared "
             "evaluation).", "",
             "| library | test ELBO (nats) | train images/s | generated images/s |",
             "|---|---:|---:|---:|"]
    lines += [f"| {k} | {r['test_elbo']:.2f} | {r['train_images_per_s']} | "
              f"{r['generated_images_per_s']} |" for k, r in v.items()]
    lines += ["", f"Outlier detection: one class normal, the other nine outliers, "
              f"{result['ad_epochs']} epochs per fit; ROC-AUC averaged over the ten classes.", "",
              "| library | mean ROC-AUC | fit time, all ten classes (s) |", "|---|---:|---:|"]
    lines += [f"| {k} | {r['mean_roc_auc']:.4f} | {r['fit_s_all_classes']:.1f} |"
              for k, r in d.items()]
    versions = ", ".join(f"{k} {val}" for k, val in result["versions"].items())
    lines += ["", f"Versions: {versions}; torch threads {result['threads']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for peers.json, peers.md and PNGs")
    p.add_argument("--epochs", type=int, default=10, help="VAE epochs")
    p.add_argument("--ad-epochs", type=int, default=10, help="outlier-detector epochs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ds = data.load("fashion-mnist")
    x_train = torch.from_numpy(ds.inputs("train"))
    x_test = torch.from_numpy(ds.inputs("test"))
    result = {"epochs": args.epochs, "ad_epochs": args.ad_epochs, "seed": args.seed,
              "batch": 128, "lr": 1e-3, "threads": torch.get_num_threads(),
              "vae_model": "MLP 784-512-256-32, Bernoulli likelihood, trained on 60000 images",
              "detector_model": "MLP 784-512-128-32-128-512-784, MSE, inliers of one class",
              "versions": {k: importlib.metadata.version(k)
                           for k in ("aecore", "torch", "pythae", "pyod")}}
    result["vae"] = compare_vaes(x_train, x_test, args.epochs, args.seed, out)
    print(json.dumps(result["vae"], indent=1), flush=True)
    result["outliers"] = compare_detectors(ds, args.ad_epochs, args.seed)
    print(json.dumps(result["outliers"], indent=1), flush=True)
    write_json(out / "peers.json", result)
    write_bytes(out / "peers.md", markdown(result).encode())
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
