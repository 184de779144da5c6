"""Input corruptions for denoising autoencoders, PSNR, and denoising a saved batch.

A corruption is a callable ``corruption(x, generator) -> x_noisy``: it returns a new tensor and
leaves ``x`` (the clean target) untouched; all randomness comes from the explicit
``torch.Generator``, so a seeded generator reproduces the same noise. Any model trains as a
denoiser by giving the trainer a corruption: the model sees x_noisy and its loss compares the
reconstruction with the clean x.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _check(x: object, generator: object) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating point torch.Tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != x.device.type:
        raise ValueError(f"generator must be on x's device ({x.device}), "
                         f"got a generator on {generator.device}")


def _uniform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # fp32 draws whatever x's dtype: fp16/bf16 uniforms are too coarse for small fractions.
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)


def _fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


class Corruption:
    """Base of the corruptions: ``__call__(x, generator)`` -> corrupted copy of x (any shape)."""

    name: str = ""

    @property
    def level(self) -> float:
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """The CLI string that :func:`parse_corruption` turns back into this corruption."""
        return f"{self.name}:{float(self.level)!r}"  # repr: every digit, so it round-trips

    def corrupt(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check(x, generator)
        return self.corrupt(x, generator)


@dataclass(frozen=True)
class GaussianNoise(Corruption):
    """x + sigma * N(0, 1), elementwise (no clipping: the noise statistics stay exact)."""

    sigma: float
    name = "gaussian"

    def __post_init__(self):
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)):
            raise TypeError(f"sigma must be a number >= 0, got {type(self.sigma).__name__}")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma!r}")
        # Noise is added in float32 (float64 only for float64 inputs): a sigma beyond
        # float32's range would turn every corrupted input into Inf.
        if self.sigma > FLOAT32_MAX:
            raise ValueError(f"sigma must be at most float32's largest value ({FLOAT32_MAX:.4g}),"
                             f" got {self.sigma!r}")

    @property
    def level(self) -> float:
        return float(self.sigma)

    def corrupt(self, x, generator):
        # fp32 draws for every dtype, so one seed gives the same noise at any precision.
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.to(wide) + self.sigma * noise.to(wide)).to(x.dtype)


@dataclass(frozen=True)
class _ByFraction(Corruption):
    """A corruption that hits each element independently with probability ``fraction``."""

    fraction: float

    def __post_init__(self):
        _fraction("fraction", self.fraction)

    @property
    def level(self) -> float:
        return float(self.fraction)


@dataclass(frozen=True)
class Masking(_ByFraction):
    """Each element independently set to 0 with probability ``fraction``."""

    name = "mask"

    def corrupt(self, x, generator):
        return x.masked_fill(_uniform(x, generator) < self.fraction, 0.0)


@dataclass(frozen=True)
class SaltPepper(_ByFraction):
    """Each element independently replaced with probability ``fraction``: by 0 or 1, even odds."""

    name = "saltpepper"

    def corrupt(self, x, generator):
        # One uniform u per element: u < f/2 -> pepper (0), f/2 <= u < f -> salt (1).
        u = _uniform(x, generator)
        out = x.masked_fill(u < self.fraction, 1.0)
        return out.masked_fill(u < 0.5 * self.fraction, 0.0)


CORRUPTIONS: dict[str, type[Corruption]] = {
    "gaussian": GaussianNoise, "mask": Masking, "saltpepper": SaltPepper,
}


def parse_corruption(spec: str) -> Corruption:
    """``"gaussian:0.3"`` | ``"mask:0.25"`` | ``"saltpepper:0.1"`` -> a :class:`Corruption`."""
    forms = "'gaussian:SIGMA', 'mask:FRACTION' or 'saltpepper:FRACTION'"
    if not isinstance(spec, str):
        raise TypeError(f"corruption spec must be a string such as {forms}, "
                        f"got {type(spec).__name__}")
    name, sep, value = spec.strip().partition(":")
    name = name.strip().lower()
    if not sep or name not in CORRUPTIONS:
        raise ValueError(f"corruption spec must be {forms}, got {spec!r}")
    try:
        level = float(value)
    except ValueError:
        raise ValueError(f"corruption spec {spec!r}: {value.strip()!r} is not a number "
                         f"(expected {forms})") from None
    return CORRUPTIONS[name](level)


class PSNR(NamedTuple):
    """Peak signal-to-noise ratio in dB: ``per_sample`` (B,) float64 and their ``mean``."""

    per_sample: torch.Tensor
    mean: float


def psnr(clean, other, data_range: float = 1.0) -> PSNR:
    """PSNR of ``other`` against ``clean`` (both (B, ...)): 10 log10(range^2 / MSE) per sample.

    Computed in float64; a sample reproduced exactly has PSNR inf.
    """
    clean_t = torch.as_tensor(clean).detach()
    other_t = torch.as_tensor(other).detach()
    if clean_t.shape != other_t.shape:
        raise ValueError(f"other must have the shape of clean {tuple(clean_t.shape)}, "
                         f"got {tuple(other_t.shape)}")
    if clean_t.dim() < 1 or clean_t.shape[0] < 1:
        raise ValueError(f"clean must be a batch (B, ...) with B >= 1, got shape "
                         f"{tuple(clean_t.shape)}")
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) \
            or not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    diff = clean_t.double().cpu() - other_t.double().cpu()
    mse = diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)
    per_sample = 10.0 * torch.log10(data_range**2 / mse)
    return PSNR(per_sample, float(per_sample.mean()))


@torch.no_grad()
def _run(model, x: torch.Tensor, labels: torch.Tensor | None = None,
         batch_size: int = 512) -> torch.Tensor:
    """model(x) in batches (with labels (B,) for a conditional model), on the CPU."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        extra = () if labels is None else (labels[i:i + batch_size].to(device),)
        out.append(model(x[i:i + batch_size].to(device), *extra).cpu())
    return torch.cat(out)


def denoise_report(model, clean: torch.Tensor, corruption: Corruption,
                   generator: torch.Generator, data_range: float = 1.0,
                   labels: torch.Tensor | None = None) -> dict[str, float]:
    """Corrupt ``clean`` (B, *input_shape), denoise it with ``model`` (given ``labels`` (B,)
    for a conditional model), compare both with clean.

    Returns ``{"psnr_noisy", "psnr_denoised", "psnr_gain"}`` (mean dB over the batch).
    """
    was_training = model.training
    model.eval()
    try:
        noisy = corruption(clean, generator)
        denoised = _run(model, noisy, labels)
    finally:
        model.train(was_training)
    before = psnr(clean, noisy, data_range).mean
    after = psnr(clean, denoised, data_range).mean
    return {"psnr_noisy": before, "psnr_denoised": after, "psnr_gain": after - before}


def denoise_file(model_dir: str | os.PathLike, input_npy: str | os.PathLike,
                 out_npy: str | os.PathLike, labels_npy: str | os.PathLike | None = None
                 ) -> np.ndarray:
    """Denoise the raw batch in ``input_npy`` with the model saved in ``model_dir``.

    The input is (N, *sample) or one sample, in raw units; samples may be flat or shaped, as
    long as their size matches the model's input. It is normalised with the model's
    normalization, reconstructed, mapped back to raw units and written (float32, the input's
    shape) to ``out_npy`` atomically. A conditional model also takes ``labels_npy``, a .npy of
    int class ids (one per sample). Returns the written array.
    """
    from aecore.io import atomic_write, check_output, load_model, load_npy, model_inputs

    out_npy = check_output(out_npy, ".npy", (input_npy, labels_npy))
    model = load_model(model_dir)
    conditional = bool(getattr(model, "num_classes", 0))
    if conditional and labels_npy is None:
        raise ValueError("the model is conditional: pass --labels FILE.npy (int class ids, "
                         "one per sample)")
    if labels_npy is not None and not conditional:
        raise ValueError("--labels is for conditional models; this one takes no labels")
    raw = load_npy(input_npy, "input")
    x = model_inputs(model, raw, f"input {str(input_npy)!r}")  # as aecore infer names it
    labels = None
    if conditional:
        labels = np.atleast_1d(load_npy(labels_npy, "--labels"))
        if labels.dtype.kind not in "iu" or labels.shape != (len(x),):
            raise ValueError(f"--labels must hold {len(x)} integer class ids (one per sample), "
                             f"got dtype {labels.dtype} and shape {labels.shape}")
        classes = model.num_classes
        if len(labels) and (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(f"--labels must be class ids in [0, {classes}), got values in "
                             f"[{labels.min()}, {labels.max()}]")
        labels = torch.from_numpy(labels.astype(np.int64))
    norm = model.normalization
    out = _run(model, torch.from_numpy(x), labels).numpy()
    out = norm.invert(out) if norm is not None else out
    out = np.ascontiguousarray(out.reshape(raw.shape), dtype=np.float32)

    def write(tmp: str) -> None:
        # A file object, not a name: np.save appends ".npy" to names that lack it.
        with open(tmp, "wb") as f:
            np.save(f, out, allow_pickle=False)

    atomic_write(out_npy, write)
    return out
