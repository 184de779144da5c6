"""Denoising corruptions: their statistics, reproducibility, PSNR, reports and file denoising."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from aecore.autoencoder import AutoEncoder
from aecore.corruption import (
    GaussianNoise,
    Masking,
    SaltPepper,
    denoise_file,
    denoise_report,
    parse_corruption,
    psnr,
)
from aecore.io import save_model
from aecore.normalization import Normalization

N = 200 * 500  # elements per statistics test


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _clean():
    # Values in [0.1, 0.9]: never 0 or 1, so zeroed / salted elements are unambiguous.
    return 0.1 + 0.8 * torch.rand(200, 500, generator=_gen(123))


def _within(observed: float, p: float, n: int = N, sigmas: float = 5.0) -> bool:
    """``observed`` is a binomial proportion within ``sigmas`` standard errors of p."""
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_gaussian_noise_statistics(sigma):
    x = _clean()
    keep = x.clone()
    noise = GaussianNoise(sigma)(x, _gen()) - x
    torch.testing.assert_close(x, keep, rtol=0, atol=0)  # clean target untouched
    # Sample mean: standard error sigma / sqrt(N); sample std: sigma / sqrt(2N).
    assert abs(float(noise.mean())) < 5 * sigma / math.sqrt(N)
    assert abs(float(noise.std()) - sigma) < 5 * sigma / math.sqrt(2 * N) + 1e-6
    # Symmetric, Gaussian tails: ~31.7% of draws beyond one sigma.
    assert _within(float((noise.abs() > sigma).float().mean()), 0.3173)


def test_masking_statistics():
    x = _clean()
    keep = x.clone()
    out = Masking(0.25)(x, _gen())
    zeroed = out == 0
    assert _within(float(zeroed.float().mean()), 0.25)
    assert torch.equal(out[~zeroed], x[~zeroed])  # everything else is untouched
    assert torch.equal(x, keep)


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_salt_and_pepper_statistics(fraction):
    x = _clean()
    keep = x.clone()
    out = SaltPepper(fraction)(x, _gen())
    pepper, salt = out == 0, out == 1
    assert _within(float(pepper.float().mean()), fraction / 2)
    assert _within(float(salt.float().mean()), fraction / 2)
    other = ~(pepper | salt)
    assert torch.equal(out[other], x[other])
    assert torch.equal(x, keep)


@pytest.mark.parametrize("corruption", [GaussianNoise(0.2), Masking(0.3), SaltPepper(0.2)])
def test_corruptions_are_reproducible_with_a_generator(corruption):
    x = _clean()[:20]
    a = corruption(x, _gen(7))
    b = corruption(x, _gen(7))
    c = corruption(x, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype


def test_corruptions_keep_shape_and_dtype():
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=_gen())
    for c in (GaussianNoise(0.1), Masking(0.5), SaltPepper(0.5)):
        out = c(x, _gen())
        assert out.shape == x.shape and out.dtype == torch.float64
    # float64 inputs keep their precision: the noise is added in float64.
    noisy = GaussianNoise(0.0)(x, _gen())
    assert torch.equal(noisy, x)
    half = GaussianNoise(0.1)(x.half(), _gen())
    assert half.dtype == torch.float16


def test_extreme_levels():
    x = _clean()[:10]
    assert torch.equal(GaussianNoise(0.0)(x, _gen()), x)
    assert torch.equal(Masking(0.0)(x, _gen()), x)
    assert torch.equal(Masking(1.0)(x, _gen()), torch.zeros_like(x))
    assert torch.equal(SaltPepper(0.0)(x, _gen()), x)
    full = SaltPepper(1.0)(x, _gen())
    assert bool(((full == 0) | (full == 1)).all())


def test_corruption_rejects_bad_calls():
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got NoneType"):
        Masking(0.1)(torch.rand(2, 3), None)
    with pytest.raises(TypeError, match="x must be a floating point torch.Tensor, got torch.int64"):
        Masking(0.1)(torch.ones(2, 3, dtype=torch.int64), _gen())
    with pytest.raises(TypeError, match="x must be a floating point torch.Tensor, got ndarray"):
        GaussianNoise(0.1)(np.zeros(3), _gen())
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
        Masking(1.5)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got -0.1"):
        SaltPepper(-0.1)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0, got -0.3"):
        GaussianNoise(-0.3)
    with pytest.raises(TypeError, match="sigma must be a number"):
        GaussianNoise("0.3")


@pytest.mark.parametrize("spec, cls, level", [
    ("gaussian:0.3", GaussianNoise, 0.3), ("mask:0.25", Masking, 0.25),
    ("saltpepper:0.1", SaltPepper, 0.1), (" Gaussian : 1e-2 ", GaussianNoise, 0.01),
    ("gaussian:0.1234567", GaussianNoise, 0.1234567),  # every digit survives the spec
])
def test_parse_corruption(spec, cls, level):
    c = parse_corruption(spec)
    assert type(c) is cls and c.level == level
    assert parse_corruption(c.spec) == c


@pytest.mark.parametrize("spec, message", [
    ("gauss:0.3", r"corruption spec must be 'gaussian:SIGMA', 'mask:FRACTION' or "
                  r"'saltpepper:FRACTION', got 'gauss:0.3'"),
    ("gaussian", "corruption spec must be .* got 'gaussian'"),
    ("", "corruption spec must be .* got ''"),
    ("mask:abc", "corruption spec 'mask:abc': 'abc' is not a number"),
    ("mask:", "corruption spec 'mask:': '' is not a number"),
    ("mask:1.5", r"fraction must be in \[0, 1\], got 1.5"),
    ("saltpepper:-0.2", r"fraction must be in \[0, 1\], got -0.2"),
    ("gaussian:nan", "sigma must be a finite number >= 0, got nan"),
])
def test_parse_corruption_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_corruption(spec)


def test_parse_corruption_rejects_non_strings():
    with pytest.raises(TypeError, match="corruption spec must be a string"):
        parse_corruption(0.3)


def test_psnr_matches_float64_formula():
    rng = np.random.default_rng(0)
    clean = rng.random((6, 3, 5, 7))
    other = clean + 0.05 * rng.standard_normal(clean.shape)
    for data_range in (1.0, 255.0):
        result = psnr(torch.from_numpy(clean).float(), torch.from_numpy(other).float(),
                      data_range)
        c32 = clean.astype(np.float32).astype(np.float64)
        o32 = other.astype(np.float32).astype(np.float64)
        mse = ((c32 - o32) ** 2).reshape(6, -1).mean(axis=1)
        expected = 10 * np.log10(data_range**2 / mse)
        np.testing.assert_allclose(result.per_sample.numpy(), expected, rtol=1e-12)
        assert result.per_sample.dtype == torch.float64 and result.per_sample.shape == (6,)
        assert abs(result.mean - expected.mean()) < 1e-9
    # A closed form: a constant error of 0.1 on a unit range is exactly 20 dB.
    exact = psnr(np.zeros((2, 4)), np.full((2, 4), 0.1))
    np.testing.assert_allclose(exact.per_sample.numpy(), [20.0, 20.0], rtol=1e-12)
    assert psnr(torch.ones(1, 3), torch.ones(1, 3)).mean == math.inf


def test_psnr_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"other must have the shape of clean \(2, 3\)"):
        psnr(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="data_range must be a positive number, got 0"):
        psnr(torch.zeros(2, 3), torch.zeros(2, 3), data_range=0)
    with pytest.raises(ValueError, match="clean must be a batch"):
        psnr(torch.tensor(1.0), torch.tensor(1.0))


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.from_numpy(load_digits().data[:600].astype(np.float32) / 16.0)


def test_denoise_report_of_identity_model_has_no_gain(digits):
    class Identity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x + self.dummy

    corruption = GaussianNoise(0.2)
    report = denoise_report(Identity(), digits, corruption, _gen(3))
    noisy = corruption(digits, _gen(3))
    assert report["psnr_noisy"] == pytest.approx(psnr(digits, noisy).mean, rel=1e-12)
    assert report["psnr_denoised"] == pytest.approx(report["psnr_noisy"], rel=1e-12)
    assert report["psnr_gain"] == pytest.approx(0.0, abs=1e-9)
    # Gaussian noise of std sigma on a unit range: PSNR = -20 log10(sigma) ~ 13.98 dB.
    assert report["psnr_noisy"] == pytest.approx(-20 * math.log10(0.2), abs=0.2)


@pytest.fixture(scope="module")
def denoiser(digits) -> AutoEncoder:
    """An MLP AE trained on digits corrupted by salt and pepper, against the clean digits."""
    torch.manual_seed(0)
    model = AutoEncoder(64, hidden_dims=(64,), latent_dim=24, output_activation="sigmoid")
    corruption, g = SaltPepper(0.2), _gen(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        xb = digits[torch.randint(len(digits), (128,), generator=g)]
        loss = model.loss(corruption(xb, g), target=xb)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_denoising_autoencoder_raises_psnr(denoiser, digits):
    report = denoise_report(denoiser, digits, SaltPepper(0.2), _gen(2))
    assert report["psnr_gain"] > 3.0, report  # dB
    assert report["psnr_gain"] == pytest.approx(report["psnr_denoised"] - report["psnr_noisy"])
    assert denoiser.training is False


@pytest.mark.parametrize("layout", ["flat", "images", "one"])
def test_denoise_file(denoiser, digits, tmp_path, layout):
    model = AutoEncoder(**denoiser.config())
    model.load_state_dict(denoiser.state_dict())
    model.normalization = Normalization(mean=0.0, std=16.0)  # raw digits are 0..16
    save_model(model, tmp_path / "model")
    raw = (digits[:10] * 16).numpy()
    raw = {"flat": raw, "images": raw.reshape(10, 8, 8), "one": raw[0]}[layout]
    np.save(tmp_path / "in.npy", raw)
    out_path = tmp_path / "out" / "denoised.npy"
    returned = denoise_file(tmp_path / "model", tmp_path / "in.npy", out_path)
    written = np.load(out_path)
    assert written.shape == raw.shape and written.dtype == np.float32
    np.testing.assert_array_equal(written, returned)
    with torch.no_grad():
        expected = model(torch.from_numpy(raw.reshape(-1, 64) / 16.0)).numpy() * 16.0
    np.testing.assert_allclose(written.reshape(-1, 64), expected, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in out_path.parent.iterdir()) == ["denoised.npy"]  # no temp left


def test_denoise_file_rejects_wrong_sizes(denoiser, tmp_path):
    save_model(denoiser, tmp_path / "model")
    np.save(tmp_path / "bad.npy", np.zeros((4, 63), np.float32))
    with pytest.raises(ValueError, match=r"input '.*' must hold samples of shape \(64,\)"):
        denoise_file(tmp_path / "model", tmp_path / "bad.npy", tmp_path / "out.npy")
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("raw,match", [
    (np.zeros((0, 64), np.float32), r"input '.*' holds no samples"),
    (np.full((2, 64), np.nan, np.float32), r"input '.*' contains NaN or Inf"),
    # Finite in float64, Inf once cast to the model's float32.
    (np.full((2, 64), 1e39), r"input '.*' holds values beyond float32's range"),
])
def test_denoise_file_rejects_empty_and_nonfinite_inputs(tmp_path, raw, match):
    save_model(AutoEncoder(64, hidden_dims=(8,), latent_dim=4), tmp_path / "model")
    np.save(tmp_path / "in.npy", raw)
    with pytest.raises(ValueError, match=match):
        denoise_file(tmp_path / "model", tmp_path / "in.npy", tmp_path / "out.npy")
    assert not (tmp_path / "out.npy").exists()


def test_conditional_models_denoise_with_their_labels(tmp_path, capsys):
    from aecore.cli import main
    from aecore.vae import ConditionalVAE

    # Training with --corruption reports PSNR on the test split, which a conditional model
    # reconstructs only given the test labels.
    assert main(["train", "--model", "cvae", "--data", "digits", "--limit", "64", "--epochs",
                 "1", "--batch-size", "32", "--corruption", "gaussian:0.1", "--quiet",
                 "--out", str(tmp_path / "cvae")]) == 0
    assert "psnr_gain=" in capsys.readouterr().out
    torch.manual_seed(0)
    model = ConditionalVAE(3, 64, hidden_dims=(8,), latent_dim=2).eval()
    save_model(model, tmp_path / "model")
    raw = np.random.default_rng(0).random((5, 64)).astype(np.float32)
    labels = np.array([0, 1, 2, 1, 0])
    np.save(tmp_path / "in.npy", raw)
    np.save(tmp_path / "labels.npy", labels)
    out = denoise_file(tmp_path / "model", tmp_path / "in.npy", tmp_path / "out.npy",
                       labels_npy=tmp_path / "labels.npy")
    with torch.no_grad():
        want = model(torch.from_numpy(raw), torch.from_numpy(labels)).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="the model is conditional: pass --labels"):
        denoise_file(tmp_path / "model", tmp_path / "in.npy", tmp_path / "out2.npy")
    np.save(tmp_path / "few.npy", labels[:3])
    with pytest.raises(ValueError, match="--labels must hold 5 integer class ids"):
        denoise_file(tmp_path / "model", tmp_path / "in.npy", tmp_path / "out2.npy",
                     labels_npy=tmp_path / "few.npy")
    np.save(tmp_path / "big.npy", np.full(5, model.num_classes, np.int64))
    with pytest.raises(ValueError, match=rf"--labels must be class ids in \[0, "
                                         rf"{model.num_classes}\), got values in"):
        denoise_file(tmp_path / "model", tmp_path / "in.npy", tmp_path / "out2.npy",
                     labels_npy=tmp_path / "big.npy")
    save_model(AutoEncoder(64, hidden_dims=(8,), latent_dim=2), tmp_path / "plain")
    with pytest.raises(ValueError, match="--labels is for conditional models"):
        denoise_file(tmp_path / "plain", tmp_path / "in.npy", tmp_path / "out2.npy",
                     labels_npy=tmp_path / "labels.npy")
