"""Convolutional autoencoders: architecture against plain torch ops, training, shapes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from aecore.conv import ConvAutoEncoder, ConvDecoder, ConvEncoder
from aecore.io import load_model, save_model
from aecore.normalization import Normalization
from aecore.registry import MODELS

UPSAMPLE = ("bilinear", "transposed")


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    x = load_digits().data[:384].astype(np.float32) / 16.0
    return torch.from_numpy(x).reshape(-1, 1, 8, 8)


def _train(model, x, steps, lr=3e-3, batch=64, seed=0) -> tuple[float, float]:
    """(loss on x before, after) ``steps`` Adam steps on random batches of x."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        before = float(model.loss(x)["loss"])
    for _ in range(steps):
        xb = x[torch.randint(len(x), (min(batch, len(x)),), generator=g)]
        loss = model.loss(xb)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(model.loss(x)["loss"])
    return before, after


def test_encoder_is_conv_relu_pool_then_dense():
    torch.manual_seed(0)
    enc = ConvEncoder((3, 12, 20), channels=(4, 6), out_dim=5, activation="tanh")
    x = torch.rand(2, 3, 12, 20, dtype=torch.float64)
    enc = enc.double()
    h = x
    for conv in enc.convs:
        h = F.max_pool2d(torch.tanh(F.conv2d(h, conv.weight, conv.bias, padding=1)), 2)
    assert h.shape == (2, 6, 3, 5)
    expected = h.flatten(1) @ enc.fc.weight.T + enc.fc.bias
    torch.testing.assert_close(enc(x), expected)


@pytest.mark.parametrize("upsample", UPSAMPLE)
def test_decoder_is_dense_then_upsampling_stages(upsample):
    torch.manual_seed(0)
    dec = ConvDecoder((3, 16, 24), channels=(6, 4), in_dim=5, upsample=upsample).double()
    z = torch.randn(2, 5, dtype=torch.float64)
    h = torch.relu(z @ dec.fc.weight.T + dec.fc.bias).reshape(2, 6, 4, 6)
    for stage in dec.stages:
        if upsample == "bilinear":
            conv = stage[1]
            up = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
            h = torch.relu(F.conv2d(up, conv.weight, conv.bias, padding=1))
        else:
            h = torch.relu(F.conv_transpose2d(h, stage.weight, stage.bias, stride=2))
    expected = F.conv2d(h, dec.out.weight, dec.out.bias, padding=1)
    assert expected.shape == (2, 3, 16, 24)
    torch.testing.assert_close(dec(z), expected)


@pytest.mark.parametrize("upsample", UPSAMPLE)
def test_conv_autoencoder_trains_on_digits(upsample, digits):
    torch.manual_seed(0)
    model = ConvAutoEncoder((1, 8, 8), channels=(8, 16), latent_dim=16, upsample=upsample)
    before, after = _train(model, digits, 300, lr=1e-2)
    assert after < 0.5 * before, (before, after)
    # Better than predicting every image as the mean image.
    assert after < 0.5 * float(digits.var(dim=0).mean())


@pytest.mark.parametrize("upsample", UPSAMPLE)
@pytest.mark.parametrize("shape, channels", [((1, 12, 20), (4, 8)), ((3, 16, 24), (4, 8, 8))])
def test_odd_image_sizes(shape, channels, upsample):
    torch.manual_seed(0)
    model = ConvAutoEncoder(shape, channels=channels, latent_dim=6, upsample=upsample,
                            output_activation="identity")
    x = torch.rand(16, *shape)
    assert model.encode(x).shape == (16, 6)
    assert model.decode(torch.randn(3, 6)).shape == (3, *shape)
    assert model(x).shape == x.shape
    before, after = _train(model, x, 30, lr=1e-2, batch=16)
    assert after < before, (before, after)


def test_output_activation_and_symmetric_decoder():
    model = ConvAutoEncoder((1, 8, 8), channels=(4, 8), latent_dim=3)
    out = model(torch.randn(5, 1, 8, 8) * 10)
    assert out.min() >= 0 and out.max() <= 1
    assert model.decoder.channels == (8, 4)
    assert [c.out_channels for c in model.encoder.convs] == [4, 8]
    assert model.family == "conv-ae" and MODELS["conv-ae"] is ConvAutoEncoder


def test_loss_compares_with_target():
    torch.manual_seed(0)
    model = ConvAutoEncoder((1, 8, 8), channels=(4,), latent_dim=3)
    x, target = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    terms = model.loss(x, target=target)
    assert set(terms) == {"loss", "mse"}
    with torch.no_grad():
        torch.testing.assert_close(terms["mse"], (model(x) - target).pow(2).mean())
        torch.testing.assert_close(model.loss(x)["mse"], (model(x) - x).pow(2).mean())


@pytest.mark.parametrize("shape, channels", [((1, 12, 20), (4, 8, 16)), ((1, 10, 10), (8, 16)),
                                             ((3, 8, 7), (4,))])
def test_sizes_the_pooling_does_not_divide_raise(shape, channels):
    with pytest.raises(ValueError, match=r"input_shape \(.*\): height and width must be "
                                         r"divisible by 2\*\*len\(channels\)"):
        ConvAutoEncoder(shape, channels=channels)
    with pytest.raises(ValueError, match="output_shape"):
        ConvDecoder(shape, channels=channels, in_dim=4)


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8, 1), (0, 8, 8), (1, -8, 8), "1x8x8",
                                   (1.5, 8, 8)])
def test_bad_input_shape_raises(shape):
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\) with positive"):
        ConvAutoEncoder(shape)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="channels must be a non-empty sequence"):
        ConvAutoEncoder((1, 8, 8), channels=())
    with pytest.raises(ValueError, match="channels must be a non-empty sequence"):
        ConvEncoder((1, 8, 8), channels=(4, 0), out_dim=3)
    with pytest.raises(ValueError, match=r"upsample must be one of \('bilinear', 'transposed'\)"):
        ConvAutoEncoder((1, 8, 8), upsample="nearest")
    with pytest.raises(ValueError, match="output_activation must be one of"):
        ConvAutoEncoder((1, 8, 8), output_activation="relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        ConvAutoEncoder((1, 8, 8), activation="swish")
    with pytest.raises(ValueError, match="out_dim must be a positive integer, got 0"):
        ConvEncoder((1, 8, 8), out_dim=0)
    with pytest.raises(ValueError, match="latent_dim must be a positive integer, got 0"):
        ConvAutoEncoder((1, 8, 8), latent_dim=0)
    with pytest.raises(ValueError, match="in_dim must be a positive integer"):
        ConvDecoder((1, 8, 8), in_dim=2.5)


def test_bad_inputs_raise():
    model = ConvAutoEncoder((1, 8, 8), channels=(4,), latent_dim=3)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 1, 8, 8\), got \(2, 64\)"):
        model(torch.rand(2, 64))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 1, 8, 8\)"):
        model.encode(torch.rand(2, 3, 8, 8))
    with pytest.raises(TypeError, match="x must be a floating point tensor"):
        model(torch.ones(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"target must have shape \(batch, 1, 8, 8\)"):
        model.loss(torch.rand(2, 1, 8, 8), target=torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="target must have the shape of x"):
        model.loss(torch.rand(2, 1, 8, 8), target=torch.rand(3, 1, 8, 8))


@pytest.mark.parametrize("upsample", UPSAMPLE)
def test_config_round_trip(upsample, tmp_path, digits):
    torch.manual_seed(0)
    model = ConvAutoEncoder((1, 8, 8), channels=(4, 8), latent_dim=7, upsample=upsample,
                            activation="leaky_relu", output_activation="identity")
    model.normalization = Normalization(mean=0.0, std=16.0)
    rebuilt = ConvAutoEncoder(**model.config())
    assert rebuilt.config() == model.config()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, ConvAutoEncoder)
    assert loaded.config() == model.config()
    assert loaded.input_shape == (1, 8, 8) and loaded.upsample == upsample
    assert loaded.normalization == model.normalization
    with torch.no_grad():
        torch.testing.assert_close(loaded(digits[:9]), model.eval()(digits[:9]))
