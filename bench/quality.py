"""Reconstruction quality of every autoencoder family on the Fashion-MNIST test set.

Trains each family that ``aecore train --model`` builds (``aecore.families.BUILDERS``, so new
families join the table without changes here) at one latent size with the same epochs, batch,
learning rate, training subset and seed, and compares the test MSE of its deterministic
reconstruction with PCA's at the same number of components. It also measures the PSNR gain of
the denoising autoencoder at Gaussian sigma = 0.3 beside a plain autoencoder as a control, and
the VQ-VAE's codebook perplexity and code size in bits.

Run: ``python bench/quality.py --out runs/quality``; writes quality.md and quality.json there
(atomically) and prints the markdown. The defaults fit in about ten minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aecore import data as datasets
from aecore import families
from aecore.corruption import GaussianNoise, denoise_report, parse_corruption
from aecore.io import write_bytes, write_json
from aecore.quickstart import pca_mse
from aecore.train import Trainer, evaluate

# Families whose PSNR under noise is reported: the denoiser and the plain autoencoder as control.
DENOISING = ("dae", "ae")


@dataclass
class Settings:
    """One run's settings; every family trains with the same ones.

    ``train_size`` / ``test_size``: the first N samples of each split (None = all).
    ``threads``: torch intra-op threads (None = torch's default).
    ``families``: names from ``aecore.families.BUILDERS`` (None = all of them).
    """

    data: str = "fashion-mnist"
    data_root: str | None = None
    latent: int = 32
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    train_size: int | None = 20000
    test_size: int | None = None
    sigma: float = 0.3
    seed: int = 0
    threads: int | None = 1
    families: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("latent", "epochs", "batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("train_size", "test_size", "threads"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("lr", "sigma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.families is not None:
            self.families = tuple(self.families)
            unknown = [f for f in self.families if f not in families.BUILDERS]
            if unknown or not self.families:
                raise ValueError(f"families must be names from {sorted(families.BUILDERS)}, "
                                 f"got {list(self.families)!r}")

    def family_names(self) -> list[str]:
        return list(self.families) if self.families is not None else list(families.BUILDERS)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def count_params(model: torch.nn.Module) -> int:
    """Trainable parameters; shared (tied) tensors count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def reconstruct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                batch_size: int = 512) -> torch.Tensor:
    """Deterministic reconstruction ``model(x)`` ((x, y) for conditional models), (N, ...) ->
    (N, ...), in eval mode and in batches."""
    was_training = model.training
    model.eval()
    try:
        parts = []
        for i in range(0, len(x), batch_size):
            args = (x[i:i + batch_size],) if y is None else (x[i:i + batch_size],
                                                              y[i:i + batch_size])
            parts.append(model(*args))
    finally:
        model.train(was_training)
    return torch.cat(parts)


def codebook_stats(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 512) -> dict | None:
    """Code usage of a vector-quantised model on ``x`` (N, ...), or None for other models.

    Perplexity = exp(entropy) of the code histogram pooled over every position of every
    sample (1 = one code used, codebook size = uniform use); bits = positions * log2(size).
    """
    if not hasattr(model, "codes"):
        return None
    size = int(model.num_codes)
    counts = torch.zeros(size, dtype=torch.float64)
    positions = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                idx = model.codes(x[i:i + batch_size])  # (B, positions) int
                positions = int(idx[0].numel())
                counts += torch.bincount(idx.reshape(-1).cpu(), minlength=size).double()
    finally:
        model.train(was_training)
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"positions": positions, "codebook_size": size, "perplexity": math.exp(entropy),
            "codes_used": int((counts > 0).sum()), "bits": positions * math.log2(size)}


def train_family(name: str, data: datasets.Dataset, s: Settings) -> tuple[torch.nn.Module, dict]:
    """Build ``name`` for ``data`` at latent ``s.latent``, train it, measure it on the test split.

    Returns (model, row); row holds test_mse (mean over every test value of the
    deterministic reconstruction), train_s, params, the training corruption, every loss term of
    the model on the test split (``test_terms``) and, for vector-quantised models, ``codebook``.
    """
    torch.manual_seed(s.seed)  # the same initial draw whatever order the families run in
    model = families.build(name, data, families.Sizes(latent=s.latent))
    flat = name not in families.IMAGE_INPUT
    labels = name in families.USES_LABELS
    x_train = data.inputs("train", flat=flat)
    t0 = time.perf_counter()  # a family's training targets (an embedding) count as training
    y_train = families.train_targets(name, data, x_train, model.latent_dim, seed=s.seed)
    spec = families.DEFAULT_CORRUPTION.get(name)
    trainer = Trainer(model, lr=s.lr, batch_size=s.batch_size, epochs=s.epochs,
                      val_fraction=0.0, seed=s.seed, device="cpu", progress=False,
                      corruption=parse_corruption(spec) if spec else None)
    history = trainer.fit(x_train, y_train)
    train_s = time.perf_counter() - t0

    x_test = torch.from_numpy(data.inputs("test", flat=flat))
    y_test = torch.from_numpy(data.labels("test")) if labels else None
    recon = reconstruct(model, x_test, y_test)
    test_mse = float((recon.double() - x_test.double()).pow(2).mean())
    torch.manual_seed(s.seed)  # stochastic loss terms (VAE sampling) draw the same noise
    terms = evaluate(model, x_test, y_test)
    row = {"family": name, "test_mse": test_mse, "train_s": train_s,
           "params": count_params(model), "corruption": spec, "conditional": labels,
           "final_train_loss": history[-1]["train_loss"] if history else None,
           "test_terms": terms, "codebook": codebook_stats(model, x_test)}
    return model, row


def denoising_row(model: torch.nn.Module, name: str, data: datasets.Dataset, s: Settings) -> dict:
    """PSNR (dB, data range 1) on the test split with Gaussian noise ``s.sigma``: of the noisy
    input, of the model's output, and the gain; the noise is seeded, so every model sees the
    same noisy images."""
    clean = torch.from_numpy(data.inputs("test", flat=name not in families.IMAGE_INPUT))
    generator = torch.Generator().manual_seed(s.seed + 10)
    report = denoise_report(model, clean, GaussianNoise(s.sigma), generator)
    return {"family": name, "trained_on": families.DEFAULT_CORRUPTION.get(name) or "clean",
            "sigma": s.sigma, **report}


def run(s: Settings, out: str | os.PathLike | None = None, log=print) -> dict:
    """Train and measure every family of ``s``; write quality.md/.json under ``out`` if given.

    Returns the results: settings, data sizes, PCA, per-family rows, denoising rows, elapsed.
    """
    t_start = time.perf_counter()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    data = datasets.load(s.data, root=s.data_root, seed=s.seed).subset(s.train_size, s.test_size)
    if s.latent >= data.input_dim:
        raise ValueError(f"latent must be smaller than the input size {data.input_dim}, "
                         f"got {s.latent}")
    x_train, x_test = data.inputs("train"), data.inputs("test")
    log(f"{data.name}: {len(x_train)} train / {len(x_test)} test samples of "
        f"{data.sample_shape}; latent {s.latent}, {s.epochs} epochs, batch {s.batch_size}, "
        f"lr {s.lr:g}, seed {s.seed}, {torch.get_num_threads()} thread(s)")

    t0 = time.perf_counter()
    pca = {"components": s.latent, "test_mse": pca_mse(x_train, x_test, s.latent, s.seed),
           "fit_s": time.perf_counter() - t0,
           "params": s.latent * data.input_dim + data.input_dim}  # components + mean
    log(f"  pca  test_mse={pca['test_mse']:.5f}  ({pca['fit_s']:.1f}s)")

    rows, models = [], {}
    for name in s.family_names():
        model, row = train_family(name, data, s)
        row["ratio_to_pca"] = row["test_mse"] / pca["test_mse"]
        rows.append(row)
        models[name] = model
        log(f"  {name}  test_mse={row['test_mse']:.5f}  ratio={row['ratio_to_pca']:.3f}  "
            f"train {row['train_s']:.1f}s  params {row['params']}")
    denoising = [denoising_row(models[n], n, data, s) for n in DENOISING if n in models]

    results = {
        "settings": asdict(s),
        "data": {"name": data.name, "train": len(x_train), "test": len(x_test),
                 "sample_shape": list(data.sample_shape)},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "pca": pca, "families": rows, "denoising": denoising,
        "elapsed_s": time.perf_counter() - t_start,
    }
    if out is not None:
        out = Path(out)
        write_json(out / "quality.json", results)
        write_bytes(out / "quality.md", to_markdown(results).encode())
    return results


def _mse(v: float) -> str:
    return f"{v:.5f}"


def to_markdown(results: dict) -> str:
    """The results as a markdown section: settings, the MSE table, denoising, codebooks."""
    s, d, pca = results["settings"], results["data"], results["pca"]
    env = results["environment"]
    lines = [
        f"Test set: {d['test']} {d['name']} images; every family trains on the first "
        f"{d['train']} training images for {s['epochs']} epochs (batch {s['batch_size']}, "
        f"Adam lr {s['lr']:g}, seed {s['seed']}, no validation split) with latent size "
        f"{s['latent']} and otherwise the defaults of `aecore train`. PCA keeps "
        f"{pca['components']} components fitted on the same images. MSE is the mean over all "
        f"pixels (scaled to [0, 1]) of the deterministic reconstruction (VAEs: decode(mu); "
        f"VQ-VAE: the quantised code). Train time is wall-clock on {env['cpu_count']} CPU cores "
        f"shared with other work, {env['threads']} torch thread(s), torch {env['torch']}; "
        f"the whole run took {results['elapsed_s'] / 60:.1f} min.",
        "",
        "| model | test MSE | MSE / PCA | train time (s) | parameters | notes |",
        "|---|---:|---:|---:|---:|---|",
        f"| PCA ({pca['components']} components) | {_mse(pca['test_mse'])} | 1.00 | "
        f"{pca['fit_s']:.1f} | {pca['params']:,} | linear baseline |",
    ]
    for r in results["families"]:
        notes = []
        if r["corruption"]:
            notes.append(f"trained on `{r['corruption']}` inputs")
        if r.get("conditional"):
            notes.append("also given the class label")
        if r["codebook"]:
            c = r["codebook"]
            notes.append(f"code: {c['positions']} x {c['codebook_size']}-entry codebook = "
                         f"{c['bits']:g} bits")
        lines.append(f"| {r['family']} | {_mse(r['test_mse'])} | {r['ratio_to_pca']:.2f} | "
                     f"{r['train_s']:.1f} | {r['params']:,} | {'; '.join(notes)} |")
    if results["denoising"]:
        sigma = results["denoising"][0]["sigma"]
        lines += [
            "",
            f"Denoising, test set with Gaussian noise sigma = {sigma:g} (unclipped, same noise "
            f"for every model), PSNR in dB with data range 1:",
            "",
            "| model | trained on | PSNR noisy input | PSNR output | gain (dB) |",
            "|---|---|---:|---:|---:|",
        ]
        for r in results["denoising"]:
            lines.append(f"| {r['family']} | {r['trained_on']} | {r['psnr_noisy']:.2f} | "
                         f"{r['psnr_denoised']:.2f} | {r['psnr_gain']:+.2f} |")
    coded = [r for r in results["families"] if r["codebook"]]
    if coded:
        lines += [
            "",
            "Vector quantisation, codebook use on the test set (perplexity = exp of the entropy "
            "of the code histogram over all positions; its maximum is the codebook size):",
            "",
            "| model | code | bits / image | perplexity | codes used |",
            "|---|---|---:|---:|---:|",
        ]
        for r in coded:
            c = r["codebook"]
            lines.append(f"| {r['family']} | {c['positions']} x {c['codebook_size']} | "
                         f"{c['bits']:g} | {c['perplexity']:.1f} | {c['codes_used']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> tuple[Settings, str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--latent", type=int, default=Settings.latent)
    p.add_argument("--epochs", type=int, default=Settings.epochs)
    p.add_argument("--batch-size", type=int, default=Settings.batch_size)
    p.add_argument("--lr", type=float, default=Settings.lr)
    p.add_argument("--train-size", type=int, default=Settings.train_size,
                   help="first N training samples; 0 = all")
    p.add_argument("--test-size", type=int, default=0, help="first N test samples; 0 = all")
    p.add_argument("--sigma", type=float, default=Settings.sigma)
    p.add_argument("--seed", type=int, default=Settings.seed)
    # One thread by default: on a small machine shared with other jobs, torch's spinning
    # worker threads slowed training by more than 10x when the cores were oversubscribed.
    p.add_argument("--threads", type=int, default=Settings.threads,
                   help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--families", default=None,
                   help=f"comma-separated subset of {','.join(families.BUILDERS)}")
    a = p.parse_args(argv)
    s = Settings(data=a.data, data_root=a.data_root, latent=a.latent, epochs=a.epochs,
                 batch_size=a.batch_size, lr=a.lr, train_size=a.train_size or None,
                 test_size=a.test_size or None, sigma=a.sigma, seed=a.seed,
                 threads=a.threads or None,
                 families=tuple(f for f in a.families.split(",") if f) if a.families else None)
    return s, a.out


def main(argv: list[str] | None = None) -> int:
    try:
        settings, out = parse_args(argv)
        results = run(settings, out)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    print()
    print(to_markdown(results), end="")
    print(f"\nwrote {Path(out) / 'quality.md'} and {Path(out) / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
