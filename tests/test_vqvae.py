"""aecore.vqvae.VQVAE: loss terms against float64 formulas, straight-through gradients, EMA
codebook updates, dead-code re-seeding, perplexity, training on real data, save/load."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from sklearn.datasets import load_digits
from tolerances import assert_close

from aecore.io import load_model, save_model
from aecore.registry import MODELS
from aecore.vqvae import VQVAE, perplexity


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.tensor(load_digits().data / 16.0, dtype=torch.float32)


def _model(**kw) -> VQVAE:
    torch.manual_seed(0)
    args = {"input_dim": 64, "hidden_dims": (32,), "num_latents": 4, "code_dim": 8,
            "num_codes": 16}
    return VQVAE(**{**args, **kw})


def _oracle_terms(model: VQVAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss terms recomputed in float64 with brute-force assignment."""
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    z = m64.encoder(x64).reshape(-1, model.code_dim)
    cb = m64.codebook.detach()
    idx = torch.cdist(z, cb).argmin(1)
    e = cb[idx]
    sq = (z - e).pow(2).mean()
    recon = (m64.decoder(e.reshape(x.shape[0], -1)) - x64).pow(2).mean()
    return {"recon": recon, "codebook": sq, "commitment": model.beta * sq, "idx": idx}


def test_registered_family():
    assert MODELS["vq-vae"] is VQVAE


@pytest.mark.parametrize("ema", [False, True])
def test_loss_terms_match_float64(digits, ema):
    model = _model(beta=0.3, ema=ema).eval()
    x = digits[:37]
    out = model.loss(x)
    ref = _oracle_terms(model, x)
    assert set(out) == {"loss", "recon", "codebook", "commitment", "perplexity"}
    assert torch.equal(model.codes(x).reshape(-1), ref["idx"])
    with pytest.raises(ValueError, match="x must be finite: its codes hold NaN or Inf"):
        model.codes(torch.full_like(x[:2], float("nan")))
    bad = x[:3].clone()
    bad[1, 0] = float("nan")
    with torch.no_grad():  # a NaN row stays NaN, the others decode as before
        out_bad, out_good = model(bad), model(x[:3])
    assert torch.isnan(out_bad[1]).all() and torch.equal(out_bad[[0, 2]], out_good[[0, 2]])
    k = model.code_dim
    for name in ("recon", "codebook", "commitment"):
        assert_close(out[name], ref[name], torch.float32, k=64, scale=ref[name].item())
    expected = ref["recon"] + ref["commitment"] + (0 if ema else ref["codebook"])
    assert_close(out["loss"], expected, torch.float32, k=64 * k, scale=expected.item())


def test_straight_through_gradient():
    model = _model()
    z_e = torch.randn(5, model.latent_dim, requires_grad=True)
    z_q, idx = model.quantize(z_e)
    assert idx.shape == (5, model.num_latents) and idx.dtype == torch.int64
    torch.testing.assert_close(z_q.detach(), model.codebook.detach()[idx].reshape(5, -1),
                               rtol=0, atol=1e-6)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    # d z_q / d z_e is the identity
    assert torch.equal(z_e.grad, g)


def test_gradients_reach_encoder_and_codebook(digits):
    model = _model().train()
    out = model.loss(digits[:16])
    model.zero_grad()
    out["recon"].backward(retain_graph=True)
    first = model.encoder.layers[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    # The reconstruction term alone does not move the codebook ...
    assert model.codebook.grad is None or model.codebook.grad.abs().sum() == 0
    model.zero_grad()
    out["codebook"].backward()
    # ... the codebook term does, on the used codes only.
    used = torch.zeros(model.num_codes, dtype=torch.bool)
    used[model.codes(digits[:16]).unique()] = True
    row_norm = model.codebook.grad.abs().sum(1)
    assert (row_norm[used] > 0).all() and (row_norm[~used] == 0).all()


def test_ema_updates_codebook_without_gradients(digits):
    model = _model(ema=True, decay=0.9, eps=1e-3).train()
    assert "codebook" not in dict(model.named_parameters())
    assert not model.codebook.requires_grad
    x = digits[:32]
    before = model.codebook.clone()
    count0, sum0 = model.ema_count.clone().double(), model.ema_sum.clone().double()
    with torch.no_grad():
        z = model.encoder(x).reshape(-1, model.code_dim).double()
    idx = torch.cdist(z, before.double()).argmin(1)
    model.loss(x)
    # float64 formulas: moving averages of counts and sums, Laplace-smoothed counts.
    onehot = torch.nn.functional.one_hot(idx, model.num_codes).double()
    count = 0.9 * count0 + 0.1 * onehot.sum(0)
    sums = 0.9 * sum0 + 0.1 * onehot.t() @ z
    n = count.sum()
    smoothed = (count + 1e-3) / (n + model.num_codes * 1e-3) * n
    expected = sums / smoothed[:, None]
    assert not torch.equal(model.codebook, before)
    assert_close(model.codebook, expected, torch.float32, k=32, scale=expected.abs().max().item())
    assert_close(model.ema_count, count, torch.float32, k=32, scale=n.item())
    # eval mode leaves the codebook alone
    model.eval()
    frozen = model.codebook.clone()
    model.loss(x)
    assert torch.equal(model.codebook, frozen)


def _park_codes(model: VQVAE) -> None:
    """Move codes 4.. far from every encoder output, so that they are never assigned."""
    with torch.no_grad():
        model.codebook[4:] = 1e3
        if model.ema:
            model.ema_sum[4:] = 1e3  # the EMA state the codebook is recomputed from


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_are_reseeded_from_the_batch(digits, ema):
    model = _model(dead_after=2, ema=ema, seed=123).train()
    _park_codes(model)
    x = digits[:20]
    with torch.no_grad():
        z = model.encoder(x).reshape(-1, model.code_dim)
    model.loss(x)
    assert (model.codebook[4:] > 500).all()  # unused for one step only: kept
    assert (model.unused_steps[4:] == 1).all()
    model.loss(x)
    fresh = model.codebook[4:]
    # every re-seeded code is one of the batch's encoder outputs
    dist = torch.cdist(fresh.double(), z.double())
    assert (dist.min(1).values < 1e-6).all()
    assert (model.unused_steps[4:] == 0).all()
    if ema:
        assert torch.equal(model.ema_sum[4:], fresh) and (model.ema_count[4:] == 1).all()
    # the choice comes from the model's generator: the same seed gives the same codes
    twin = _model(dead_after=2, ema=ema, seed=123).train()
    _park_codes(twin)
    twin.loss(x)
    twin.loss(x)
    assert torch.equal(twin.codebook, model.codebook)


def test_no_reseeding_when_disabled(digits):
    model = _model(dead_after=0).train()
    with torch.no_grad():
        model.codebook[4:] = 1e3
    for _ in range(3):
        model.loss(digits[:20])
    assert (model.codebook[4:] == 1e3).all()
    assert (model.unused_steps[4:] == 3).all()


@pytest.mark.parametrize("ema", [False, True])
def test_a_nan_batch_leaves_the_codebook_alone(digits, ema):
    model = _model(dead_after=1, ema=ema).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = digits[:20].clone()
    x[3, 5] = float("nan")
    assert not torch.isfinite(model.loss(x)["loss"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model.loss(digits[:20])  # a finite batch still updates it
    assert not torch.equal(model.codebook, before["codebook"])


def test_perplexity_formula():
    assert perplexity(torch.tensor([3, 3, 3]), 8).item() == pytest.approx(1.0)
    assert perplexity(torch.arange(8), 8).item() == pytest.approx(8.0)
    assert perplexity(torch.tensor([[0, 0], [1, 1]]), 4).item() == pytest.approx(2.0)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 10, (300,), generator=g)
    p = torch.bincount(idx, minlength=10).double() / 300
    p = p[p > 0]
    assert perplexity(idx, 10).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()),
                                                      rel=1e-5)


def test_loss_reports_batch_perplexity(digits):
    model = _model().eval()
    out = model.loss(digits[:16])
    assert out["perplexity"].item() == pytest.approx(
        perplexity(model.codes(digits[:16]), model.num_codes).item())


def test_loss_statistics_count_the_batchs_codes(digits):
    model = _model().eval()
    x = digits[:16]
    terms, stats = model.loss_and_statistics(x)
    assert set(stats) == {"code_counts"}
    assert torch.equal(stats["code_counts"],
                       torch.bincount(model.codes(x).reshape(-1), minlength=model.num_codes))
    for k, v in model.loss(x).items():
        assert torch.equal(v, terms[k]), k
    assert model.pooled_terms(stats)["perplexity"].item() == pytest.approx(
        terms["perplexity"].item())


@pytest.mark.parametrize("batch_size", [7, 64, 512, 5000])
def test_evaluate_reports_the_whole_sets_perplexity(digits, batch_size):
    from aecore.train import evaluate

    # Small batches see fewer of the codes the set uses: the mean of per-batch perplexities
    # falls short of the whole set's, and varies with the batch size.
    model = _model().eval()
    x = digits[:1000]
    whole = perplexity(model.codes(x), model.num_codes).item()
    batch_mean = sum(perplexity(model.codes(x[i:i + 7]), model.num_codes).item() * len(
        x[i:i + 7]) for i in range(0, len(x), 7)) / len(x)
    assert batch_mean < whole - 0.5
    result = evaluate(model, x, batch_size=batch_size)
    assert result["perplexity"] == pytest.approx(whole, rel=1e-6)
    # The other terms stay means over samples.
    assert result["recon"] == pytest.approx(evaluate(model, x, batch_size=1000)["recon"],
                                            rel=1e-5)
    assert not model.training


@pytest.mark.parametrize("ema", [False, True])
def test_training_on_digits_lowers_the_loss(digits, ema):
    model = _model(ema=ema, dead_after=10).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        xb = digits[torch.randint(0, digits.shape[0], (64,), generator=g)]
        out = model.loss(xb)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    model.eval()
    assert model.loss(digits)["perplexity"].item() > 2.0


def test_codes_and_decode_codes_agree_with_forward(digits):
    model = _model().eval()
    x = digits[:7]
    idx = model.codes(x)
    assert idx.shape == (7, 4) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < model.num_codes
    with torch.no_grad():
        torch.testing.assert_close(model.decode_codes(idx), model(x))


def test_save_load_round_trip(tmp_path, digits):
    model = _model(ema=True, dead_after=3, beta=0.5).train()
    for i in range(3):
        model.loss(digits[i * 16:(i + 1) * 16])
    model.eval()
    save_model(model, tmp_path / "vq")
    loaded = load_model(tmp_path / "vq")
    assert isinstance(loaded, VQVAE) and loaded.config() == model.config()
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    x = digits[:9]
    assert torch.equal(loaded.codes(x), model.codes(x))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_conv_encoder(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(input_shape=(1, 8, 8), channels=(4,), num_latents=3, code_dim=5, num_codes=7)
    x = torch.rand(6, 1, 8, 8)
    assert model(x).shape == (6, 1, 8, 8)
    assert model.codes(x).shape == (6, 3)
    out = model.train().loss(x)
    out["loss"].backward()
    assert model.encoder.convs[0].weight.grad.abs().sum() > 0
    save_model(model.eval(), tmp_path / "conv")
    loaded = load_model(tmp_path / "conv")
    assert torch.equal(loaded.codes(x), model.codes(x))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_codes": 0}, ValueError, "num_codes must be a positive integer, got 0"),
        ({"code_dim": 2.5}, ValueError, "code_dim must be a positive integer, got 2.5"),
        ({"decay": 1.0}, ValueError, r"decay must be a number in \(0, 1\), got 1.0"),
        # 0 would replace the averages with one batch's and zero every code it missed.
        ({"decay": 0.0}, ValueError, r"decay must be a number in \(0, 1\), got 0.0"),
        ({"beta": -1}, ValueError, "beta must be a finite number >= 0, got -1"),
        ({"beta": True}, ValueError, "beta must be a finite number >= 0, got True"),
        ({"eps": 0}, ValueError, "eps must be a positive finite number, got 0"),
        ({"dead_after": -1}, ValueError, "dead_after must be a non-negative integer"),
        ({"ema": 1}, TypeError, "ema must be a bool, got int"),
        ({"input_dim": None}, ValueError, "input_dim is required"),
        # int() truncated these to 6: a model of another size than asked for.
        ({"input_dim": None, "input_shape": (6.7,)}, ValueError,
         r"input_shape\[0\] must be a positive integer, got 6.7"),
        ({"input_dim": 64, "input_shape": (64.5,)}, ValueError,
         r"input_shape\[0\] must be a positive integer, got 64.5"),
        ({"upsample": "nearest"}, ValueError, "upsample must be one of"),  # config() saves it
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _model(**kwargs)


def test_bad_call_arguments(digits):
    model = _model()
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 64\), got \(3, 63\)"):
        model(torch.zeros(3, 63))
    # Labels, which the Trainer passes to every model, leave an unconditional loss as it is.
    torch.manual_seed(0)
    with_y = model.eval().loss(digits[:2], y=torch.zeros(2))
    assert all(torch.equal(v, model.loss(digits[:2])[k]) for k, v in with_y.items())
    for z, err, match in ((torch.zeros(32), ValueError, r"z must have shape \(batch, 32\)"),
                          (torch.zeros(2, 31), ValueError, r"z must have shape \(batch, 32\)"),
                          (torch.zeros(2, 32, dtype=torch.float64), TypeError,
                           "z must have the model's dtype torch.float32")):
        with pytest.raises(err, match=match):
            model.decode(z)
    with pytest.raises(TypeError, match="z_e must be a floating point torch.Tensor, got list"):
        model.quantize([1.0, 2.0])
    with pytest.raises(ValueError, match=r"z_e must have shape \(batch, 32\)"):
        model.quantize(torch.zeros(2, 31))
    with pytest.raises(TypeError, match="indices must be an integer tensor, got torch.float32"):
        model.decode_codes(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"indices must have shape \(batch, 4\), got \(2, 3\)"):
        model.decode_codes(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\), got values in \[0, 16\]"):
        model.decode_codes(torch.tensor([[0, 1, 2, 16]]))


def test_onnx_export_matches_torch(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _model().eval()
    prog = torch.onnx.export(model, (torch.rand(5, 64),), dynamo=True,
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                             input_names=["x"], output_names=["y"])
    path = tmp_path / "vq.onnx"
    prog.save(str(path), external_data=False)
    # The nearest-code search exports as plain math: ArgMin, no custom op.
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "ArgMin" in ops and not any("aecore" in op for op in ops), ops
    x = torch.rand(9, 64)
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    assert abs(got - expected).max() < 1e-5


def test_resume_with_dead_code_reseeding_is_exact(digits, tmp_path):
    """The re-seeding generator travels with the Trainer's checkpoints."""
    from aecore.train import Trainer

    def run(epochs, folder, resume=False):
        model = _model(dead_after=2, num_codes=32)
        Trainer(model, lr=3e-3, epochs=epochs, batch_size=64, progress=False,
                checkpoint_dir=tmp_path / folder).fit(digits[:600], resume=resume)
        return model

    full = run(6, "a")
    run(3, "b")
    resumed = run(6, "b", resume=True)
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
