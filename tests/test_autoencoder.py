import json
import math

import pytest
import torch
from torch import nn

import aecore
from aecore import families
from aecore.autoencoder import AutoEncoder, Encoder
from aecore.data import load_digits
from aecore.io import load_model, save_model
from aecore.layers import FusedLinear
from aecore.normalization import Normalization
from aecore.vae import VAE
from aecore.vqvae import VQVAE


def test_fused_linear_is_a_drop_in_for_linear():
    torch.manual_seed(0)
    ref = nn.Linear(7, 5)
    torch.manual_seed(0)
    fused = FusedLinear(7, 5, activation="tanh")
    for name, p in ref.named_parameters():  # same initialisation from the same seed
        torch.testing.assert_close(p, dict(fused.named_parameters())[name])
    fused.load_state_dict(ref.state_dict())
    assert set(fused.state_dict()) == set(ref.state_dict())
    x = torch.randn(3, 7)
    torch.testing.assert_close(fused(x), torch.tanh(ref(x)))
    no_bias = FusedLinear(7, 5, bias=False, activation="relu")
    assert no_bias.bias is None and no_bias(x).shape == (3, 5)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation must be one of"):
        FusedLinear(3, 2, activation="swish")
    with pytest.raises(ValueError, match="hidden_dims"):
        Encoder(4, [0], 2)
    with pytest.raises(ValueError, match=r"must be positive integers, got \[4, 4.0, 2\]"):
        Encoder(4, [4.0], 2)  # as positive_int refuses 4.0
    with pytest.raises(TypeError, match="negative_slope must be a real number, got bool"):
        FusedLinear(3, 2, activation="leaky_relu", negative_slope=True)
    with pytest.raises(ValueError, match="negative_slope must be finite, got nan"):
        FusedLinear(3, 2, activation="leaky_relu", negative_slope=float("nan"))


def test_autoencoder_shapes_and_tied_weights():
    torch.manual_seed(0)
    ae = AutoEncoder(20, [16, 8], 3)
    x = torch.rand(5, 20)
    assert ae.encode(x).shape == (5, 3) and ae(x).shape == (5, 20)
    tied = AutoEncoder(20, [16, 8], 3, tied=True)
    n_untied = sum(p.numel() for p in ae.parameters())
    n_tied = sum(p.numel() for p in tied.parameters())
    weights = sum(layer.weight.numel() for layer in tied.encoder.layers)
    assert n_untied - n_tied == weights  # the decoder owns biases only
    # The tied decoder really is the transposed encoder: check against explicit math.
    z = torch.randn(4, 3)
    h = z
    layers = list(tied.encoder.layers)[::-1]
    for i, (layer, b) in enumerate(zip(layers, tied.decoder.biases)):
        h = h @ layer.weight + b
        if i < len(layers) - 1:
            h = torch.relu(h)
    torch.testing.assert_close(tied.decode(z), h)
    # Gradients of the reconstruction reach the shared weights from both sides.
    tied.loss(x)["loss"].backward()
    assert all(layer.weight.grad is not None for layer in tied.encoder.layers)


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied):
    ae = AutoEncoder(12, [6], 2, tied=tied, output_activation="sigmoid")
    ae.normalization = Normalization(mean=0.0, std=255.0)
    save_model(ae, tmp_path / "m", history=[{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1}])
    back = load_model(tmp_path / "m")
    assert isinstance(back, AutoEncoder) and back.config() == ae.config()
    assert back.normalization == ae.normalization
    x = torch.rand(3, 12)
    torch.testing.assert_close(back(x), ae.eval()(x))
    assert aecore.io.load_history(tmp_path / "m")[0]["val_loss"] == 1.1
    assert not list(tmp_path.glob("m/*.tmp"))


def test_history_is_strict_json(tmp_path):
    """A non-finite metric is written as null, not as a bare NaN that other parsers reject."""
    ae = AutoEncoder(4, [3], 2)
    history = [{"epoch": 1, "train_loss": 0.5, "train_kl": math.nan, "val_ratio": [math.inf]}]
    save_model(ae, tmp_path / "m", history=history)

    def refuse(name):
        raise ValueError(f"bare {name} in history.json")

    text = (tmp_path / "m" / "history.json").read_text()
    assert json.loads(text, parse_constant=refuse)[0] == {
        "epoch": 1, "train_loss": 0.5, "train_kl": None, "val_ratio": [None]}
    assert aecore.io.load_history(tmp_path / "m")[0]["train_kl"] is None


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an aecore model folder"):
        load_model(tmp_path)
    aecore.io.write_json(tmp_path / "config.json", {"family": "nope", "kwargs": {}})
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="map_location must be a device such as 'cpu'"):
        load_model(tmp_path, map_location="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="map_location 'cuda' needs CUDA"):
            load_model(tmp_path, map_location="cuda")


def _rewrite_weights(path, change):
    """Rewrite the first tensor of a weights file through ``change``."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    first = sorted(state)[0]
    state[first] = change(state[first])
    save_file(state, str(path))


def test_save_model_refuses_non_finite_weights(tmp_path):
    model = AutoEncoder(12, [6], 2)
    save_model(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.decoder.layers[0].bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"model holds NaN or Inf in \['decoder.layers.0.bias'\]"):
        save_model(model, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("config", ['{"model_type": "bert"}', "{", "[1]"],
                         ids=["another-tool", "not-json", "not-an-object"])
def test_save_model_leaves_another_tools_folder_alone(tmp_path, config):
    # A config.json that no aecore save wrote is someone else's, and so is the weights file
    # beside it: neither is replaced or deleted.
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(config)
    (other / "model.safetensors").write_bytes(b"their weights")
    with pytest.raises(ValueError, match="holds a config.json that is not an aecore model's"):
        save_model(AutoEncoder(12, [6], 2), other)
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "model.safetensors"]
    assert (other / "config.json").read_text() == config
    assert (other / "model.safetensors").read_bytes() == b"their weights"


@pytest.mark.parametrize("damage,match", [
    (lambda d, c: (d / "config.json").write_text("{"), "is not valid JSON"),
    (lambda d, c: (d / "config.json").write_text("[1]"), "must hold a JSON object"),
    (lambda d, c: aecore.io.write_json(d / "config.json", {"kwargs": c["kwargs"]}),
     "must name the model's 'family'"),
    (lambda d, c: aecore.io.write_json(d / "config.json", {**c, "kwargs": {"bogus": 1}}),
     "the kwargs do not build a 'ae' model"),
    (lambda d, c: aecore.io.write_json(
        d / "config.json", {**c, "kwargs": {**c["kwargs"], "latent_dim": 3}}),
     r"does not match the model config.json describes: .*has shape \(2, 6\), the model's is "
     r"\(3, 6\)"),
    (lambda d, c: (d / c["weights"]).write_bytes(b"xx"), "is not a readable safetensors file"),
    (lambda d, c: (d / c["weights"]).unlink(), "no weights file"),
    (lambda d, c: _rewrite_weights(d / c["weights"], lambda v: v.fill_(float("nan"))),
     r"'decoder.layers.0.bias' holds NaN or Inf"),
    (lambda d, c: _rewrite_weights(d / c["weights"], lambda v: v.to(torch.int64)),
     r"'decoder.layers.0.bias' is torch.int64, the model's is torch.float32"),
])
def test_load_model_names_what_is_wrong_with_a_damaged_folder(tmp_path, damage, match):
    import json

    save_model(AutoEncoder(12, [6], 2), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    damage(tmp_path / "m", config)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_model(tmp_path / "m")


def test_check_input_messages():
    ae = AutoEncoder(4, [3], 2)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 4\)"):
        ae.check_input(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="floating point"):
        ae.check_input(torch.zeros(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("make", [
    lambda: AutoEncoder(4, hidden_dims=(3,), latent_dim=2),
    lambda: aecore.ContractiveAutoEncoder(4, hidden_dims=(3,), latent_dim=2),
    lambda: aecore.VQVAE(4, hidden_dims=(3,), num_latents=1, code_dim=2, num_codes=4),
], ids=["ae", "cae", "vq-vae"])
def test_loss_rejects_targets_of_another_shape(make):
    model = make()
    x = torch.rand(2, 4)
    # (1, 4) would broadcast silently; (3, 4) failed deep inside the subtraction.
    for bad in (torch.rand(1, 4), torch.rand(3, 4), torch.rand(2, 4, 1)):
        with pytest.raises(ValueError, match="target must have"):
            model.loss(x, target=bad)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 4\)"):
        model.loss(torch.rand(2, 5))


@pytest.mark.parametrize("name", sorted(families.BUILDERS))
def test_loss_rejects_an_empty_batch(name):
    # A mean over no samples is NaN, which would train or report silently on nothing.
    digits = load_digits()
    model = families.build(name, digits, families.Sizes(hidden=[24], latent=8, channels=[4]))
    x = torch.zeros(0, *model.input_shape)
    y = torch.zeros(0, dtype=torch.int64) if name in families.USES_LABELS else None
    with pytest.raises(ValueError, match=r"x must hold at least one sample.*\(0, "):
        model.loss(x, y)


@pytest.mark.parametrize("name", sorted(families.BUILDERS))
def test_encode_and_decode_name_a_bad_batch(name):
    digits = load_digits()
    model = families.build(name, digits, families.Sizes(hidden=[24], latent=8, channels=[4]))
    x = torch.rand(3, *model.input_shape)
    with pytest.raises(TypeError, match="x must have the model's dtype torch.float32, got "
                                        "torch.float64"):
        model(x.double())
    for bad in (x[0], x[None]):  # one sample without its batch dim; an extra dim
        with pytest.raises(ValueError, match=r"x must have shape \(batch, "):
            model(bad)
    if name != "vq-vae":  # its decoder takes quantized code vectors
        y = torch.zeros(3, dtype=torch.int64) if name in families.USES_LABELS else None
        for z in (torch.rand(3), torch.rand(3, 5)):
            with pytest.raises(ValueError, match=r"z must have shape \(batch, 8\)"):
                model.decode(z, y) if y is not None else model.decode(z)


def test_vae_likelihoods_reject_targets_outside_their_support():
    x = torch.rand(4, 6)
    bernoulli = VAE(6, hidden_dims=(4,), latent_dim=2, likelihood="bernoulli")
    for bad in (x * 5, -x):
        with pytest.raises(ValueError, match=r"target must be in \[0, 1\] for a Bernoulli"):
            bernoulli.loss(bad)
    for evaluate in (bernoulli.elbo, bernoulli.log_likelihood):
        with pytest.raises(ValueError, match=r"x must be in \[0, 1\] for a Bernoulli"):
            evaluate(x * 5)
    multinomial = VAE(6, hidden_dims=(4,), latent_dim=2, likelihood="multinomial")
    with pytest.raises(ValueError, match="target must be non-negative counts for a multinomial"):
        multinomial.loss(x, target=-x)


def test_tied_decoder_checks_activations_when_built():
    with pytest.raises(ValueError, match="activation must be one of"):
        AutoEncoder(4, hidden_dims=(3,), latent_dim=2, tied=True, output_activation="nope")
    with pytest.raises(ValueError, match="activation must be one of"):
        AutoEncoder(4, hidden_dims=(3,), latent_dim=2, tied=True, activation="nope")


@pytest.mark.parametrize("kwargs", [{"input_dim": 4.5}, {"hidden_dims": (3.5,)},
                                    {"hidden_dims": "ab"}])
def test_fractional_or_non_numeric_sizes_are_rejected(kwargs):
    # int() alone truncated 4.5 to 4: a model of another size than asked for.
    with pytest.raises(ValueError, match="must be (a )?positive integers?"):
        AutoEncoder(**{"input_dim": 4, "hidden_dims": (3,), "latent_dim": 2, **kwargs})


@pytest.mark.parametrize("make", [lambda: AutoEncoder(10, 8, 4), lambda: VAE(10, 8, 4),
                                  lambda: VQVAE(6, 5)])
def test_a_bare_int_for_hidden_dims_names_the_argument(make):
    with pytest.raises(TypeError, match="hidden_dims must be a list of positive integers, got"):
        make()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arg", ["activation", "output_activation", "latent_activation"])
def test_a_bad_activation_is_named(arg, tied):
    # The error named "activation" for a bad output or latent activation too.
    with pytest.raises(ValueError, match=rf"^{arg} must be one of .*, got 'sigmoidd'$"):
        AutoEncoder(4, (3,), 2, tied=tied, **{arg: "sigmoidd"})


@pytest.mark.parametrize("tied", ["no", 1, None])
def test_tied_must_be_a_bool(tied):
    with pytest.raises(TypeError, match="tied must be a bool"):
        AutoEncoder(4, (3,), 2, tied=tied)


def test_image_grid_rejects_nonpositive_nrow_and_other_formats(tmp_path):
    from aecore.plots import save_image_grid

    with pytest.raises(ValueError, match="nrow must be a positive int"):
        save_image_grid(torch.rand(3, 5, 7).numpy(), tmp_path / "g.png", nrow=0)
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(ValueError, match=r"path must be a .png file path"):
        save_image_grid(torch.rand(3, 5, 7).numpy(), tmp_path / "g.jpg")


def test_image_grid_draws_channels_first_images(tmp_path, monkeypatch):
    import aecore.plots as plots

    shown = []
    real = plots.plt.Axes.imshow
    monkeypatch.setattr(plots.plt.Axes, "imshow",
                        lambda ax, img, **kw: (shown.append(img), real(ax, img, **kw))[1])
    images = torch.rand(3, 4, 5, 7, generator=torch.Generator().manual_seed(0)).numpy()
    for c, want in ((1, (5, 7)), (3, (5, 7, 3)), (2, (5, 7)), (4, (5, 7))):
        shown.clear()
        plots.save_image_grid(images[:, :c], tmp_path / f"g{c}.png")
        assert [s.shape for s in shown] == [want] * 3
    # 4 channels: their mean
    torch.testing.assert_close(torch.as_tensor(shown[0]), torch.as_tensor(images[0].mean(0)))
