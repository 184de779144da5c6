"""VAE, beta-VAE and conditional VAE on scikit-learn's digits (8x8, scaled to [0, 1])."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aecore import data
from aecore.io import load_model, save_model
from aecore.kernels.reparameterize import reparameterize
from aecore.registry import MODELS
from aecore.vae import VAE, ConditionalVAE, grid_shape, sample_grid


@pytest.fixture(scope="module")
def digits():
    ds = data.load_digits()
    x = torch.from_numpy(ds.inputs("train"))
    y = torch.from_numpy(ds.labels("train"))
    assert 0.0 <= x.min() and x.max() <= 1.0
    return x, y


MLP = {"input_dim": 64, "hidden_dims": [64], "latent_dim": 4}
CONV = {"input_shape": (1, 8, 8), "channels": [8, 16], "latent_dim": 4}

CASES = {
    "mlp-bernoulli": (VAE, MLP, {}),
    "mlp-gaussian": (VAE, MLP, {"likelihood": "gaussian", "sigma": 0.3}),
    "mlp-gaussian-learned-feature": (VAE, MLP, {"likelihood": "gaussian-learned"}),
    "mlp-gaussian-learned-scalar": (VAE, MLP, {"likelihood": "gaussian-learned",
                                               "variance": "scalar"}),
    "conv-bernoulli": (VAE, CONV, {}),
    "conv-gaussian": (VAE, CONV, {"likelihood": "gaussian", "sigma": 0.3,
                                  "upsample": "transposed"}),
    "conv-gaussian-learned": (VAE, CONV, {"likelihood": "gaussian-learned"}),
    "beta-vae": (VAE, MLP, {"beta": 4.0}),
    "cvae-mlp": (ConditionalVAE, MLP, {"num_classes": 10}),
    "cvae-conv": (ConditionalVAE, CONV, {"num_classes": 10}),
}


def _build(name):
    cls, arch, kw = CASES[name]
    torch.manual_seed(0)
    return cls(**arch, **kw)


def _inputs(model, x, y):
    x = x.view(-1, *model.input_shape)
    return x, (y if model.num_classes else None)


@pytest.mark.parametrize("name", list(CASES))
def test_training_lowers_the_loss(name, digits):
    model = _build(name)
    x, y = _inputs(model, *digits)
    xe, ye = x[:256], None if y is None else y[:256]

    def held_loss():
        torch.manual_seed(123)  # the same noise before and after training
        with torch.no_grad():
            return model.loss(xe, ye)

    before = held_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        idx = torch.randint(len(x), (128,), generator=g)
        terms = model.loss(x[idx], None if y is None else y[idx])
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    after = held_loss()
    assert torch.isfinite(after["loss"])
    # At least 10% of the starting loss gone (the Gaussian losses may cross zero).
    assert after["loss"] < before["loss"] - 0.1 * abs(before["loss"])
    # The terms add up: loss = recon + beta * kl, with kl >= 0.
    beta = model.beta
    torch.testing.assert_close(after["loss"], after["recon"] + beta * after["kl"])
    assert after["kl"] >= 0


@pytest.fixture(scope="module")
def trained(digits):
    """A small MLP VAE trained for a few hundred steps (for the bound checks)."""
    x, _ = digits
    torch.manual_seed(0)
    model = VAE(64, [64], 4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(300):
        idx = torch.randint(len(x), (128,), generator=g)
        loss = model.loss(x[idx])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_elbo_is_minus_the_loss_with_the_same_noise(trained, digits):
    x = digits[0][:50]
    torch.manual_seed(7)
    elbo = trained.elbo(x)
    torch.manual_seed(7)
    with torch.no_grad():
        loss = trained.loss(x)["loss"]
    assert elbo.shape == (50,)
    torch.testing.assert_close(-elbo.mean(), loss)


def test_importance_weighted_bound_is_tighter_than_the_elbo(trained, digits):
    x = digits[0][:64]
    g = torch.Generator().manual_seed(3)
    elbo = trained.elbo(x, k=20, generator=g)
    ll = trained.log_likelihood(x, k=200, generator=g)
    ll1 = trained.log_likelihood(x, k=1, generator=g)
    assert ll.shape == (64,) and torch.isfinite(ll).all()
    # IWAE: E[L_k] increases with k; L_1 is the ELBO (here estimated with more draws).
    assert ll.mean() > elbo.mean()
    assert abs(ll1.mean() - elbo.mean()) < 0.05 * abs(elbo.mean())
    # A log-likelihood of 64 Bernoulli pixels: negative, and above the all-0.5 model's.
    assert (ll < 0).all() and ll.mean() > 64 * math.log(0.5)


@pytest.mark.parametrize("chunk", [3, 7, 50, 120])
def test_log_likelihood_decodes_at_most_chunk_rows(chunk):
    # k > chunk splits one input's draws across calls; the noise, and so the result, is the same.
    torch.manual_seed(0)
    model = VAE(6, [8], 3).eval()
    x = torch.rand(5, 6)
    rows = []
    hook = model.decoder.register_forward_hook(lambda mod, inp, out: rows.append(len(out)))
    a = model.log_likelihood(x, k=50, chunk=chunk, generator=torch.Generator().manual_seed(0))
    hook.remove()
    b = model.log_likelihood(x, k=50, generator=torch.Generator().manual_seed(0))
    assert max(rows) <= chunk and sum(rows) == 5 * 50
    assert a.shape == (5,)
    torch.testing.assert_close(a, b)


def _bernoulli_log_px(raw, x):
    return -F.binary_cross_entropy_with_logits(raw, x, reduction="none").sum(-1)


def _iwae_oracle(model64, x, mu, lv, eps):
    """float64 log-mean-exp of the importance weights of z = mu + exp(lv / 2) * eps, (B,)."""
    B, k, L = eps.shape
    z = mu[:, None] + torch.exp(0.5 * lv)[:, None] * eps
    log_px = _bernoulli_log_px(model64.decoder(z.reshape(-1, L)),
                               x.repeat_interleave(k, 0)).view(B, k)
    log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
    log_q = -0.5 * (eps.pow(2) + lv[:, None] + math.log(2 * math.pi)).sum(-1)
    return torch.logsumexp(log_px + log_pz - log_q, 1) - math.log(k)


def test_log_likelihood_log_q_is_exact_near_the_logvar_clamp():
    # std = e^-14 is below float32's spacing at |mu| = 3: (z - mu) / std would lose eps.
    torch.manual_seed(0)
    model = VAE(6, [8], 8).eval()
    B, k, L = 4, 8, 8
    x = torch.rand(B, 6, dtype=torch.float64)
    mu, lv = torch.full((B, L), 3.0), torch.full((B, L), -28.0)
    model.encode = lambda x, y=None: (mu, lv)
    ll = model.log_likelihood(x.float(), k=k, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the documented noise: one (k, L) draw per input
    eps = torch.stack([torch.randn(k, L, generator=g) for _ in range(B)]).double()
    oracle = _iwae_oracle(copy.deepcopy(model).double(), x, mu.double(), lv.double(), eps)
    torch.testing.assert_close(ll.double(), oracle, atol=1e-3, rtol=0)


def test_float64_model_keeps_float64():
    torch.manual_seed(0)
    model = VAE(6, [8], 3).double().eval()
    x = torch.rand(4, 6, dtype=torch.float64)
    mu, lv = model.encode(x)
    elbo = model.elbo(x, generator=torch.Generator().manual_seed(1))
    z, _ = reparameterize(mu, lv, generator=torch.Generator().manual_seed(1))  # the same z
    kl = 0.5 * (mu.pow(2) + lv.exp() - 1 - lv).sum(1)
    assert elbo.dtype == torch.float64
    torch.testing.assert_close(elbo, _bernoulli_log_px(model.decoder(z), x) - kl)
    ll = model.log_likelihood(x, k=5, chunk=3, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    eps = torch.stack([torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(4)])
    assert ll.dtype == torch.float64
    torch.testing.assert_close(ll, _iwae_oracle(model, x, mu, lv, eps))


def test_sample_reconstruct_interpolate(trained, digits):
    x = digits[0][:5]
    s = trained.sample(7, generator=torch.Generator().manual_seed(0))
    assert s.shape == (7, 64) and 0 <= s.min() and s.max() <= 1
    torch.testing.assert_close(s, trained.sample(7, generator=torch.Generator().manual_seed(0)))
    rec = trained.reconstruct(x)
    torch.testing.assert_close(rec, trained(x))
    noisy = trained.reconstruct(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert noisy.shape == x.shape and not torch.equal(noisy, rec)
    path = trained.interpolate(x[0], x[1], steps=6)
    assert path.shape == (6, 64)
    torch.testing.assert_close(path[0], rec[0])
    torch.testing.assert_close(path[-1], rec[1])
    batch = trained.interpolate(x[:2], x[2:4], steps=3)
    assert batch.shape == (2, 3, 64)
    torch.testing.assert_close(batch[1, -1], rec[3])


@pytest.mark.parametrize("steps", [1, 0, -2, 3.0, True, "4"])
def test_interpolate_needs_both_endpoints(steps):
    model = VAE(6, [8], 3)
    x = torch.rand(2, 6)
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        model.interpolate(x[0], x[1], steps=steps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sample_draws_z_in_the_model_dtype(dtype):
    torch.manual_seed(0)
    s = VAE(6, [8], 3).to(dtype).sample(4, generator=torch.Generator().manual_seed(0))
    assert s.shape == (4, 6) and s.dtype == dtype
    s = ConditionalVAE(3, 6, [8], 3).to(dtype).sample(4, labels=1)
    assert s.shape == (4, 6) and s.dtype == dtype


def test_sample_label_errors_name_labels():
    cvae = ConditionalVAE(3, 6, [8], 2)
    with pytest.raises(ValueError, match=r"labels is required: integer labels \(4,\) in \[0, 3\)"):
        cvae.sample(4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got values in \[3, 3\]"):
        cvae.sample(4, labels=3)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        cvae.sample(4, labels=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="labels must hold integer labels"):
        cvae.sample(4, labels=torch.zeros(4))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor of integer labels"):
        cvae.sample(4, labels=True)
    with pytest.raises(ValueError, match="labels must be None: this VAE is unconditional"):
        VAE(6, [8], 2).sample(4, labels=1)


def test_conditional_vae_uses_labels(digits):
    model = _build("cvae-conv").eval()
    x, y = _inputs(model, *digits)
    s = model.sample(4, labels=3, generator=torch.Generator().manual_seed(0))
    s2 = model.sample(4, labels=torch.full((4,), 5), generator=torch.Generator().manual_seed(0))
    assert s.shape == (4, 1, 8, 8)
    assert not torch.allclose(s, s2)  # same z, other label
    assert model(x[:3], y[:3]).shape == (3, 1, 8, 8)
    assert model.elbo(x[:3], y[:3], k=2).shape == (3,)
    assert model.log_likelihood(x[:3], y[:3], k=5).shape == (3,)
    assert model.interpolate(x[0], x[1], 4, y=2).shape == (4, 1, 8, 8)
    mu_a = model.encode(x[:2], torch.tensor([0, 0]))[0]
    mu_b = model.encode(x[:2], torch.tensor([9, 9]))[0]
    assert not torch.allclose(mu_a, mu_b)


def test_unconditional_vae_ignores_labels_in_loss_only(digits):
    model = _build("mlp-bernoulli")
    x, y = digits
    torch.manual_seed(0)
    a = model.loss(x[:8], y[:8])["loss"]
    torch.manual_seed(0)
    torch.testing.assert_close(a, model.loss(x[:8])["loss"])
    with pytest.raises(ValueError, match="y must be None"):
        model.encode(x[:8], y[:8])


def test_target_is_what_the_reconstruction_is_scored_against(digits):
    model = _build("mlp-bernoulli")
    x = digits[0][:8]
    noisy = (x + 0.3 * torch.randn(x.shape)).clamp(0, 1)
    torch.manual_seed(0)
    a = model.loss(noisy, target=x)
    torch.manual_seed(0)
    b = model.loss(noisy)
    assert not torch.allclose(a["recon"], b["recon"])
    torch.testing.assert_close(a["kl"], b["kl"])


@pytest.mark.parametrize("name", ["mlp-gaussian-learned-feature", "conv-bernoulli", "beta-vae",
                                  "cvae-mlp", "cvae-conv"])
def test_save_load_round_trip(name, digits, tmp_path):
    model = _build(name).eval()
    x, y = _inputs(model, *digits)
    x, y = x[:6], None if y is None else y[:6]
    with torch.no_grad():
        if hasattr(model, "log_sigma2"):
            model.log_sigma2.uniform_(-1, 1)
        expected = model(x, y)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config() == model.config()
    torch.testing.assert_close(loaded(x, y), expected)
    assert MODELS[model.family] is type(model)


def test_sample_grid_writes_png(trained, tmp_path):
    imgs = sample_grid(trained, 16, tmp_path / "g.png")
    assert imgs.shape == (16, 8, 8) and (tmp_path / "g.png").stat().st_size > 0
    assert np.array_equal(imgs, sample_grid(trained, 16, tmp_path / "h.png"))
    cvae = _build("cvae-mlp")
    imgs = sample_grid(cvae, 8, tmp_path / "c.png", label=4, seed=1)
    assert imgs.shape == (8, 8, 8)
    with pytest.raises(ValueError, match=r"label must be an int in \[0, 10\)"):
        sample_grid(cvae, 8, tmp_path / "d.png", label=10)
    with pytest.raises(ValueError, match="label must be None"):
        sample_grid(trained, 8, tmp_path / "e.png", label=1)
    with pytest.raises(ValueError, match="model must produce images"):
        sample_grid(VAE(10, [8], 2), 4, tmp_path / "f.png")


def test_flat_models_sample_in_their_training_images_shape(tmp_path, capsys):
    from aecore.cli import main

    # 4 x 16 images: 64 pixels, which a square guess would draw as 8 x 8.
    images = np.random.default_rng(0).random((40, 4, 16)).astype(np.float32)
    np.save(tmp_path / "wide.npy", images)
    assert main(["train", "--model", "vae", "--data", str(tmp_path / "wide.npy"), "--epochs",
                 "1", "--quiet", "--out", str(tmp_path / "m")]) == 0
    model = load_model(tmp_path / "m")
    assert model.input_shape == (64,)
    drawn = {}
    import aecore.vae

    real = aecore.vae.sample_grid
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aecore.vae, "sample_grid", lambda *a, **k: drawn.setdefault(
            "imgs", real(*a, **k)))
        assert main(["sample", str(tmp_path / "m"), "--n", "4", "--out",
                     str(tmp_path / "s.png")]) == 0
    assert drawn["imgs"].shape == (4, 1, 4, 16)
    with pytest.raises(ValueError, match=r"image_shape must be \(H, W\) or \(C, H, W\) of 64"):
        aecore.vae.sample_grid(model, 4, tmp_path / "t.png", image_shape=(5, 16))
    # The right product from negative or fractional sizes is still no image shape.
    for bad in ((-8, -8), (8.7, 8.2)):
        with pytest.raises(ValueError, match="image_shape must be positive integers"):
            aecore.vae.sample_grid(model, 4, tmp_path / "t.png", image_shape=bad)
    assert not (tmp_path / "t.png").exists()
    assert main(["sample", str(tmp_path / "m"), "--out", str(tmp_path / "s.jpg")]) == 2
    assert "--out must be a .png file path" in capsys.readouterr().err
    assert not (tmp_path / "s.jpg").exists()


def test_sample_grid_draws_samples_in_the_training_datas_units(tmp_path):
    from aecore.normalization import Normalization

    raw = data.load_digits().x_train.reshape(-1, 64)  # pixel values 0..16
    torch.manual_seed(0)
    model = VAE(64, [16], 2, likelihood="gaussian").eval()
    draw = model.sample(16, generator=torch.Generator().manual_seed(3)).numpy()

    # Per-feature standardisation (a flat table): model-space values are z-scores. They are
    # mapped back to pixel values, then by the grid's range onto [0, 1].
    model.normalization = Normalization.fit(raw)
    pixels = model.normalization.invert(draw)
    assert pixels.min() < 0 or pixels.max() > 1
    expected = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    imgs = sample_grid(model, 16, tmp_path / "a.png", seed=3)
    np.testing.assert_allclose(imgs, expected.reshape(16, 8, 8), atol=1e-6)
    assert imgs.min() == 0.0 and imgs.max() == pytest.approx(1.0)

    # Raw values already in [0, 1] are drawn as they are.
    model.normalization = Normalization(mean=(0.5 - 0.1 * draw.mean(0)).tolist(), std=0.1)
    pixels = model.normalization.invert(draw)
    assert 0 <= pixels.min() and pixels.max() <= 1
    imgs = sample_grid(model, 16, tmp_path / "b.png", seed=3)
    np.testing.assert_allclose(imgs, pixels.reshape(16, 8, 8), atol=1e-6)

    # One scale for all pixels (an image data set's: 0..16 onto [0, 1]): model space, clipped.
    model.normalization = Normalization(mean=0.0, std=16.0)
    imgs = sample_grid(model, 16, tmp_path / "c.png", seed=3)
    np.testing.assert_array_equal(imgs, np.clip(draw, 0, 1).reshape(16, 8, 8))


def test_cli_sample_of_a_flat_table_and_its_image_shape(tmp_path, capsys):
    from aecore.cli import main

    # A flat table of 8x8 digits, pixel values 0..16: trained with per-feature standardisation.
    np.save(tmp_path / "flat.npy", data.load_digits().x_train.reshape(-1, 64)[:200])
    assert main(["train", "--model", "vae", "--data", str(tmp_path / "flat.npy"), "--epochs",
                 "1", "--hidden", "16", "--quiet", "--out", str(tmp_path / "m")]) == 0
    assert main(["sample", str(tmp_path / "m"), "--n", "4", "--out",
                 str(tmp_path / "s.png")]) == 0
    model = load_model(tmp_path / "m")
    imgs = sample_grid(model, 4, tmp_path / "t.png")
    assert imgs.min() == 0.0 and imgs.max() == pytest.approx(1.0)  # not clipped z-scores
    assert main(["sample", str(tmp_path / "m"), "--n", "4", "--image-shape", "4,16", "--out",
                 str(tmp_path / "w.png")]) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "m"), "--image-shape", "5,16", "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "--image-shape must be (H, W) or (C, H, W) of 64 values (the model's input), got " \
        "(5, 16)" in capsys.readouterr().err

    # 48 features are no square image: the CLI says which flag draws them.
    np.save(tmp_path / "wide.npy", np.random.default_rng(0).random((40, 48)).astype(np.float32))
    assert main(["train", "--model", "vae", "--data", str(tmp_path / "wide.npy"), "--epochs",
                 "1", "--hidden", "16", "--quiet", "--out", str(tmp_path / "w")]) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "w"), "--out", str(tmp_path / "y.png")]) == 2
    assert "square number of pixels; pass --image-shape" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "w"), "--image-shape", "6,8", "--out",
                 str(tmp_path / "y.png")]) == 0
    assert (tmp_path / "y.png").is_file()


def test_sample_grid_rows_are_classes(tmp_path, monkeypatch):
    # Without a label, row r of the 8-wide grid is class r % num_classes.
    cvae = ConditionalVAE(2, 64, [8], 2)
    seen = []
    draw = cvae.sample
    monkeypatch.setattr(cvae, "sample", lambda n, labels=None, generator=None: (
        seen.append(labels), draw(n, labels, generator=generator))[1])
    sample_grid(cvae, 20, tmp_path / "g.png")
    rows = seen[0].split(8)
    assert [len(r) for r in rows] == [8, 8, 4]
    for r, labels in enumerate(rows):
        assert (labels == r % 2).all()


def test_triton_backend_runs_the_loss(monkeypatch, digits):
    # The fused kernels through the interpreter: same terms' structure, finite gradients.
    monkeypatch.setenv("AECORE_BACKEND", "triton")
    model = VAE(64, [16], 3)
    x = digits[0][:9]
    terms = model.loss(x)
    terms["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(terms["loss"], terms["recon"] + terms["kl"])


def test_compiled_loss_draws_its_noise_inside_the_graph(digits):
    # The sampler's seed is drawn inside the graph: the one break left is the Bernoulli
    # support check, which reads the data, and a second step compiles nothing new.
    from torch._dynamo.utils import counters

    model = _build("mlp-bernoulli")
    x = digits[0][:32]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.loss)(x)
    assert explanation.graph_break_count == 1
    assert explanation.break_reasons[0].user_stack[-1].name == "check_support"
    torch._dynamo.reset()
    loss = torch.compile(model.loss, backend="aot_eager")
    made = []
    for _ in range(2):
        before = counters["stats"]["unique_graphs"]
        loss(x)["loss"].backward()
        made.append(counters["stats"]["unique_graphs"] - before)
    assert made == [2, 0]


def test_onnx_export_of_the_deterministic_autoencoder(trained, digits, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    x = digits[0][:4]
    prog = torch.onnx.export(trained, (x,), dynamo=True, input_names=["x"],
                             output_names=["x_hat"],
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    path = tmp_path / "vae.onnx"
    prog.save(str(path), external_data=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xb = digits[0][:7]
    out = sess.run(None, {"x": xb.numpy()})[0]
    np.testing.assert_allclose(out, trained(xb).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"likelihood": "poisson"}, ValueError, "likelihood must be one of"),
    ({"variance": "diag"}, ValueError, "variance must be one of"),
    ({"sigma": 0.0}, ValueError, r"sigma must be a number in \[0.0001, 10000\], got 0.0"),
    # log(sigma^2) underflowed to log(0) and 1 / sigma^2 overflowed: no finite loss there.
    ({"sigma": 1e-20}, ValueError, r"sigma must be a number in \[0.0001, 10000\], got 1e-20"),
    ({"sigma": 1e200}, ValueError, r"sigma must be a number in \[0.0001, 10000\], got 1e\+200"),
    ({"beta": -1.0}, ValueError, "beta must be a finite number >= 0, got -1.0"),
    # A bool or a tensor is no weight: False would quietly train a plain autoencoder.
    ({"beta": False}, ValueError, "beta must be a finite number >= 0, got False"),
    ({"beta": torch.tensor(0.5)}, ValueError, "beta must be a finite number >= 0, got tensor"),
    ({"latent_dim": 0}, ValueError, "latent_dim must be a positive integer"),
    ({"upsample": "bogus"}, ValueError, "upsample must be one of"),  # an MLP VAE saves it too
    ({"input_dim": None}, ValueError, "input_dim is required"),
    ({"channels": [8]}, ValueError, "input_dim must be None for a convolutional VAE"),
    ({"input_dim": None, "channels": [8]}, ValueError, r"input_shape \(C, H, W\) is required"),
    ({"input_dim": None, "input_shape": (1, 6, 6), "channels": [4, 4]}, ValueError,
     "divisible by 2\\*\\*len\\(channels\\)"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    args = {"input_dim": 64, "hidden_dims": [8], "latent_dim": 2, **kwargs}
    with pytest.raises(exc, match=match):
        VAE(**args)


def test_numpy_scalars_are_numbers():
    # np.float32 is no Python float, but a number all the same.
    model = VAE(64, [8], 2, beta=np.float32(0.5), sigma=np.float64(0.1))
    assert (model.beta, model.sigma) == (0.5, 0.1) and type(model.beta) is float


def test_grid_shape_of_an_image_model_refuses_another_shape():
    model = VAE(input_shape=(1, 8, 8), channels=[4], latent_dim=2)
    assert grid_shape(model, (1, 8, 8)) == (1, 8, 8)
    with pytest.raises(ValueError, match=r"--image-shape is for flat models; this one draws "
                                         r"images of its own shape \(1, 8, 8\)"):
        grid_shape(model, (4, 16), "--image-shape")


def test_bad_call_arguments():
    model = VAE(64, [8], 2)
    cvae = ConditionalVAE(3, 64, [8], 2)
    x = torch.rand(4, 64)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 64\)"):
        model.loss(torch.rand(4, 63))
    with pytest.raises(TypeError, match="x must be a floating point tensor"):
        model.encode(torch.ones(4, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target must have shape \(batch, 64\)"):
        model.loss(x, target=torch.rand(4, 8))
    with pytest.raises(ValueError, match=r"z must have shape \(batch, 2\)"):
        model.decode(torch.rand(4, 3))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        model.log_likelihood(x, k=0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        model.sample(0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        model.sample(2, generator=3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got str"):
        model.log_likelihood(x, k=2, generator="g")
    with pytest.raises(ValueError, match="x2 must have the shape of x1"):
        model.interpolate(x[:2], x[:3])
    with pytest.raises(ValueError, match=r"y is required: integer labels \(4,\) in \[0, 3\)"):
        cvae.loss(x)
    with pytest.raises(TypeError, match="y must hold integer labels"):
        cvae.loss(x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"y must be in \[0, 3\)"):
        cvae.loss(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"y must have shape \(4,\)"):
        cvae.loss(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        ConditionalVAE(0, 64)
