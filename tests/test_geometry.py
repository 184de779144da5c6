import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.manifold import trustworthiness

from aecore import data as datasets
from aecore import families, geometry
from aecore.cli import main
from aecore.geometry import GeometryAutoEncoder, manifold_embedding
from aecore.io import load_model


def best_direction_spearman(z: np.ndarray, t: np.ndarray) -> float:
    """max over directions u in the plane of |Spearman(z @ u, t)|: 1 when some straight line
    through the codes orders them exactly as the roll position t."""
    angles = np.linspace(0.0, np.pi, 360, endpoint=False)
    return max(abs(spearmanr(np.cos(a) * z[:, 0] + np.sin(a) * z[:, 1], t)[0]) for a in angles)


@pytest.fixture(scope="module")
def roll():
    return datasets.load_swiss_roll(n=3000, seed=0)


def test_embedding_unrolls_the_roll_centred_at_unit_scale(roll):
    x, t = roll.inputs("train"), roll.labels("train")
    e = manifold_embedding(x, 2)
    assert e.shape == (len(x), 2) and e.dtype == np.float32
    np.testing.assert_allclose(e.mean(axis=0), 0.0, atol=1e-5)
    assert float(e.std()) == pytest.approx(1.0, rel=1e-5)
    assert best_direction_spearman(e, t) > 0.99


def test_embedding_of_large_sets_fits_a_subset_and_maps_the_rest(roll, monkeypatch):
    x, t = roll.inputs("train"), roll.labels("train")
    e = manifold_embedding(x, 2, max_fit=1500, seed=1)
    assert e.shape == (len(x), 2) and np.isfinite(e).all()
    assert best_direction_spearman(e, t) > 0.98  # the out-of-sample points land in place too
    np.testing.assert_array_equal(manifold_embedding(x, 2, max_fit=1500, seed=1), e)  # repeatable
    monkeypatch.setattr(geometry, "_CHUNK", 700)  # mapped in chunks: the same embedding
    np.testing.assert_allclose(manifold_embedding(x, 2, max_fit=1500, seed=1), e, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"dim": 0}, "dim must be a positive int"),
    ({"dim": 2, "n_neighbors": 0}, "n_neighbors must be a positive int"),
    ({"dim": 2, "max_fit": 10}, r"max_fit must be an int above max\(n_neighbors, dim\) = 10"),
    # Isomap fits the subset: it needs more rows than components, not only than neighbours.
    ({"dim": 8, "n_neighbors": 3, "max_fit": 6},
     r"max_fit must be an int above max\(n_neighbors, dim\) = 8"),
])
def test_embedding_rejects_bad_arguments(roll, kwargs, match):
    with pytest.raises(ValueError, match=match):
        manifold_embedding(roll.inputs("train"), **kwargs)


def test_embedding_takes_numpy_integers(roll):
    x = roll.inputs("train")
    np.testing.assert_array_equal(manifold_embedding(x, 2, max_fit=np.int64(300)),
                                  manifold_embedding(x, 2, max_fit=300))


def test_embedding_rejects_bad_inputs():
    with pytest.raises(ValueError, match="more than max"):
        manifold_embedding(np.zeros((5, 3), np.float32), 2, n_neighbors=10)
    with pytest.raises(ValueError, match=r"x must be a batch \(N, F\)"):
        manifold_embedding(np.zeros(5, np.float32), 2)
    bad = np.random.default_rng(0).random((50, 3)).astype(np.float32)
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        manifold_embedding(bad, 2)


def test_loss_is_reconstruction_plus_weighted_distance_to_targets():
    torch.manual_seed(0)
    model = GeometryAutoEncoder(3, [8], 2, lam=0.7).double()
    x = torch.randn(11, 3, dtype=torch.float64)
    y = torch.randn(11, 2, dtype=torch.float64)
    terms = model.loss(x, y)
    z = model.encoder(x)
    mse = ((model.decoder(z) - x) ** 2).sum() / x.numel()
    geometry = ((z - y) ** 2).sum() / z.numel()
    torch.testing.assert_close(terms["mse"], mse)
    torch.testing.assert_close(terms["geometry"], geometry)
    torch.testing.assert_close(terms["loss"], mse + 0.7 * geometry)


def test_training_needs_targets_of_the_code_shape():
    model = GeometryAutoEncoder(3, [8], 2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="trains on target embeddings: pass y"):
        model.loss(x)
    with pytest.raises(ValueError, match=r"y must have shape \(batch, latent_dim\) = \(4, 2\)"):
        model.loss(x, torch.zeros(4, 3))
    model.eval()  # scoring new data: no targets, reconstruction only
    assert set(model.loss(x)) == {"loss", "mse"}
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        GeometryAutoEncoder(3, [8], 2, lam=-1.0)


def test_swiss_roll_defaults_train_long_enough():
    roll = datasets.load("swiss-roll")
    assert families.default_hidden(roll) == [128, 128]
    assert families.default_activation(roll) == "silu"
    n = round(len(roll.x_train) * 0.9)
    epochs = families.default_epochs(n, 128)
    assert epochs * -(-n // 128) >= 1500
    assert families.default_epochs(54000, 128) == 10  # Fashion-MNIST keeps 10 epochs


def test_cli_trains_a_geometry_model_that_unrolls_the_swiss_roll(tmp_path):
    out = tmp_path / "grae"
    assert main(["train", "--model", "grae", "--data", "swiss-roll", "--out", str(out),
                 "--quiet"]) == 0
    assert (out / "latent.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0
    history = json.loads((out / "history.json").read_text())
    assert {"train_geometry", "val_geometry"} <= set(history[-1])
    # Both terms fall: the codes reach the embedding and the decoder inverts them.
    for term in ("val_mse", "val_geometry"):
        assert history[-1][term] < 0.05 * history[0][term], term
    roll = datasets.load("swiss-roll")
    model = load_model(out).eval()
    with torch.no_grad():
        z = model.encode(torch.from_numpy(roll.inputs("test"))).numpy()
    t, height = roll.labels("test"), roll.x_test[:, 1]
    spearman = best_direction_spearman(z, t)
    trust = trustworthiness(np.c_[t, height], z, n_neighbors=10)
    print(f"grae on the swiss roll: best-direction Spearman {spearman:.4f}, "
          f"trustworthiness {trust:.4f}")
    # Unrolled: one straight direction orders the test codes by roll position, and code
    # neighbourhoods are neighbourhoods on the unrolled sheet (no folds or tears).
    assert spearman > 0.98 and trust > 0.97


def test_loss_rejects_bad_targets_and_embeddings():
    model = GeometryAutoEncoder(4, hidden_dims=(3,), latent_dim=2)
    x = torch.rand(2, 4)
    with pytest.raises(TypeError, match="y must be a floating point torch.Tensor"):
        model.loss(x, np.zeros((2, 2), np.float32))
    with pytest.raises(TypeError, match="x must have the model's dtype torch.float32"):
        model.loss(x.double(), torch.zeros(2, 2))
    # A (1, 4) target would broadcast against the (2, 4) reconstruction.
    with pytest.raises(ValueError, match="target must have the shape of x"):
        model.loss(x, torch.zeros(2, 2), target=torch.rand(1, 4))
