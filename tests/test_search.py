"""Latent similarity search: exact k-NN against float64 oracles, the index file, the CLI."""

import math
import re

import numpy as np
import pytest
import torch

from aecore import search as S
from aecore.autoencoder import AutoEncoder
from aecore.cli import main
from aecore.conv import ConvAutoEncoder
from aecore.data import load_digits
from aecore.io import save_model
from aecore.normalization import Normalization
from aecore.search import LatentIndex, embed, precision_at_k
from aecore.vae import VAE


def _oracle(gallery: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """float64 distances of every pair, sorted: (distances (Q, k), indices (Q, k))."""
    g, q = gallery.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300)
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
        # |u_q - u_g|^2 / 2 = 1 - cos without 1 - cos's cancellation at tiny angles.
        d = 0.5 * ((qn[:, None, :] - gn[None, :, :]) ** 2).sum(-1)
    else:
        d = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


@pytest.mark.parametrize("metric", S.METRICS)
@pytest.mark.parametrize("n,dim,q,k", [(1, 1, 3, 1), (37, 3, 5, 37), (500, 17, 33, 10),
                                       (257, 32, 1, 7)])
def test_search_matches_float64_brute_force(metric, n, dim, q, k):
    g = torch.Generator().manual_seed(n * 31 + dim)
    gallery = torch.randn(n, dim, generator=g)
    queries = torch.randn(q, dim, generator=g)
    dist, idx = LatentIndex(gallery, metric).search(queries, k)
    want_d, want_i = _oracle(gallery.numpy(), queries.numpy(), k, metric)
    assert dist.shape == (q, k) and dist.dtype == torch.float32
    assert idx.shape == (q, k) and idx.dtype == torch.int64
    np.testing.assert_array_equal(idx.numpy(), want_i)
    np.testing.assert_allclose(dist.numpy(), want_d, rtol=2e-6, atol=2e-6)


def test_l2_is_exact_for_codes_far_from_the_origin():
    # Codes of norm ~1e4 that differ by ~1: float32's |g|^2 - 2 q.g alone rounds by ~10 in the
    # squared distances (~30 here), which reorders neighbours; centring and re-ranking do not.
    g = torch.Generator().manual_seed(0)
    offset = torch.full((1, 30), 2000.0)
    gallery = offset + torch.randn(400, 30, generator=g)
    queries = offset + torch.randn(20, 30, generator=g)
    dist, idx = LatentIndex(gallery, "l2").search(queries, 10)
    want_d, want_i = _oracle(gallery.numpy(), queries.numpy(), 10, "l2")
    np.testing.assert_array_equal(idx.numpy(), want_i)
    np.testing.assert_allclose(dist.numpy(), want_d, rtol=1e-5)


def test_l2_is_exact_for_tight_clusters_far_from_the_gallery_mean():
    # Two clusters 1000 apart, each of spread 1e-2: the centred expanded form's rounding
    # (~1e-7 of 250000) is far above the squared distances inside a cluster (~1e-3), so the
    # whole band of candidates within the bound must be re-ranked from differences.
    g = torch.Generator().manual_seed(2)
    centres = torch.zeros(2, 16)
    centres[1, 0] = 1000.0
    gallery = centres.repeat_interleave(300, 0) + 1e-2 * torch.randn(600, 16, generator=g)
    queries = centres.repeat(4, 1) + 1e-2 * torch.randn(8, 16, generator=g)
    dist, idx = LatentIndex(gallery, "l2").search(queries, 10)
    want_d, want_i = _oracle(gallery.numpy(), queries.numpy(), 10, "l2")
    np.testing.assert_array_equal(idx.numpy(), want_i)
    np.testing.assert_allclose(dist.numpy(), want_d, rtol=1e-5)


def test_cosine_orders_near_duplicates():
    # Codes 1e-5 to 2e-3 radians from the query: 1 - cos in float32 rounds all of them to 0;
    # |u_q - u_g|^2 / 2 keeps them apart and in order.
    rng = np.random.default_rng(0)
    base = rng.standard_normal(32)
    base /= np.linalg.norm(base)
    perp = rng.standard_normal((200, 32))
    perp -= np.outer(perp @ base, base)
    perp /= np.linalg.norm(perp, axis=1, keepdims=True)
    angle = np.linspace(2e-3, 1e-5, 200)  # code i is angle[i] from the query: 199 nearest
    gallery = 3.0 * (np.cos(angle)[:, None] * base + np.sin(angle)[:, None] * perp)
    dist, idx = LatentIndex(gallery.astype(np.float32), "cosine").search(
        base[None].astype(np.float32), 5)
    np.testing.assert_array_equal(idx.numpy(), [[199, 198, 197, 196, 195]])
    # The float32 codes carry rounding (~6e-8 a value) into angles of ~1e-5: against the
    # unrounded angles the distances are good to about 1%, their order exactly.
    np.testing.assert_allclose(dist.numpy()[0], 1 - np.cos(angle[[199, 198, 197, 196, 195]]),
                               rtol=1e-2)


def test_cosine_is_exact_for_a_tight_cluster_far_from_the_origin():
    # Codes of norm ~5000 spread by 1e-3: angles of ~1e-7, which float32 unit vectors round
    # away (a third of the ranks came out misordered); the re-rank normalises in float64.
    g = torch.Generator().manual_seed(3)
    base = 1000.0 * torch.randn(1, 32, generator=g)
    gallery = base + 1e-3 * torch.randn(3000, 32, generator=g)
    queries = base + 1e-3 * torch.randn(30, 32, generator=g)
    dist, idx = LatentIndex(gallery, "cosine").search(queries, 10)
    want_d, want_i = _oracle(gallery.numpy(), queries.numpy(), 10, "cosine")
    np.testing.assert_array_equal(idx.numpy(), want_i)
    np.testing.assert_allclose(dist.numpy(), want_d, rtol=1e-5)


def test_index_keeps_its_own_copy_of_the_codes():
    gallery = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    index = LatentIndex(gallery, "l2")
    gallery *= 0.0  # the caller reuses its array
    dist, idx = index.search(index.codes[:3], 1)
    np.testing.assert_array_equal(idx.numpy()[:, 0], [0, 1, 2])
    assert float(dist.max()) == 0.0


@pytest.mark.parametrize("metric", S.METRICS)
def test_search_in_chunks_gives_the_same_result(metric, monkeypatch):
    g = torch.Generator().manual_seed(1)
    gallery, queries = torch.randn(50, 6, generator=g), torch.randn(23, 6, generator=g)
    index = LatentIndex(gallery, metric)
    whole = index.search(queries, 5)
    monkeypatch.setattr(S, "CHUNK_SCORES", 120)  # two or three queries per chunk
    chunked = index.search(queries, 5)
    torch.testing.assert_close(whole[1], chunked[1], rtol=0, atol=0)
    # BLAS may sum a smaller matmul in another order: distances agree to float32 rounding.
    torch.testing.assert_close(whole[0], chunked[0], rtol=1e-6, atol=1e-6)


def test_cosine_zero_code_and_empty_queries():
    index = LatentIndex(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]), "cosine")
    dist, idx = index.search(torch.tensor([[3.0, 0.0], [0.0, 0.0]]), 3)
    assert torch.isfinite(dist).all()
    assert idx[0, 0] == 0 and dist[0, 0] == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(dist[1], torch.ones(3))  # a zero query is at distance 1 from all
    d0, i0 = index.search(torch.empty(0, 2), 2)
    assert d0.shape == (0, 2) and i0.shape == (0, 2) and i0.dtype == torch.int64


@pytest.mark.parametrize("codes,err,match", [
    (torch.empty(0, 3), ValueError, "at least one gallery code"),
    (torch.zeros(4), ValueError, r"codes must be 2-D \(N, code_dim\)"),
    (torch.zeros(4, 2, dtype=torch.int64), TypeError, "codes must be floating point"),
    (torch.tensor([[0.0, float("nan")]]), ValueError, "codes contains NaN or Inf"),
    (torch.tensor([[1e39, 0.0]], dtype=torch.float64), ValueError, "beyond float32's range"),
    (torch.tensor([[3e19, 0.0]]), ValueError, "too large to compare in float32"),
    (torch.zeros(3, 0), ValueError, "code_dim >= 1"),
    ([[0.0, 1.0]], TypeError, "codes must be a torch.Tensor or numpy array, got list"),
])
def test_index_rejects_bad_codes(codes, err, match):
    with pytest.raises(err, match=match):
        LatentIndex(codes)


def test_index_rejects_bad_metric_queries_and_k():
    with pytest.raises(ValueError, match="metric must be one of"):
        LatentIndex(torch.zeros(3, 2), "manhattan")
    index = LatentIndex(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"queries must have 4 values per code.*\(2, 3\)"):
        index.search(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="queries contains NaN or Inf"):
        index.search(torch.full((1, 4), float("inf")))
    for k in (0, 6, True, 2.5):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\]"):
            index.search(torch.zeros(1, 4), k)
    assert index.search(torch.zeros(1, 4), np.int64(3))[1].shape == (1, 3)  # numpy ints work


def test_embed_uses_codes_and_posterior_means_and_keeps_the_mode():
    torch.manual_seed(0)
    x = torch.rand(7, 20)
    ae = AutoEncoder(20, hidden_dims=(8,), latent_dim=3).train()
    with torch.no_grad():
        want = ae.eval().encode(x)
    ae.train()
    torch.testing.assert_close(embed(ae, x, batch_size=3), want)
    assert ae.training
    torch.testing.assert_close(embed(ae, x.double().numpy()), want)  # numpy float64 inputs
    vae = VAE(20, hidden_dims=(8,), latent_dim=4).eval()
    with torch.no_grad():
        mu, _ = vae.encode(x)
    torch.testing.assert_close(embed(vae, x), mu)
    conv = ConvAutoEncoder((1, 8, 8), channels=(4,), latent_dim=5).eval()
    imgs = torch.rand(3, 1, 8, 8)
    assert embed(conv, imgs).shape == (3, 5)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 1, 8, 8\)"):
        embed(conv, torch.rand(3, 64))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        embed(ae, x, batch_size=0)
    for bad in (math.nan, math.inf):
        x_bad = x.clone()
        x_bad[2, 5] = bad
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            embed(ae, x_bad)


@pytest.mark.parametrize("metric", S.METRICS)
def test_index_save_and_load(tmp_path, metric):
    g = torch.Generator().manual_seed(2)
    index = LatentIndex(torch.randn(30, 5, generator=g), metric)
    path = index.save(tmp_path / "gallery.safetensors")
    back = LatentIndex.load(path)
    assert back.metric == metric and len(back) == 30
    q = torch.randn(4, 5, generator=g)
    for a, b in zip(index.search(q, 3), back.search(q, 3)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.safetensors"]


def test_index_load_rejects_other_files(tmp_path):
    save_model(AutoEncoder(6, hidden_dims=(4,), latent_dim=2), tmp_path / "m")
    with pytest.raises(ValueError, match="is not a LatentIndex file"):
        LatentIndex.load(tmp_path / "m" / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        LatentIndex.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no index file"):
        LatentIndex.load(tmp_path / "missing.safetensors")


def test_precision_at_k():
    assert precision_at_k(np.array([[1, 1, 0], [2, 0, 0]]), np.array([1, 2])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"neighbour_labels must be \(Q, k\)"):
        precision_at_k(np.zeros((3, 2)), np.zeros(2))


def test_real_digits_pixel_search_matches_sklearn_and_finds_the_class():
    from sklearn.neighbors import NearestNeighbors

    data = load_digits(seed=0)
    gallery = data.inputs("train")
    queries = data.inputs("test")
    dist, idx = LatentIndex(gallery, "l2").search(queries, 5)
    want_d, _ = NearestNeighbors(n_neighbors=5, algorithm="brute").fit(
        gallery.astype(np.float64)).kneighbors(queries.astype(np.float64))
    # Integer pixels make equal distances common, so neighbours are compared by distance.
    np.testing.assert_allclose(dist.numpy(), want_d, rtol=1e-5, atol=1e-6)
    direct = np.linalg.norm(gallery[idx.numpy()] - queries[:, None, :], axis=2)
    np.testing.assert_allclose(dist.numpy(), direct, rtol=1e-5, atol=1e-6)
    # 5-NN on raw digit pixels is known to find the digit's class ~98% of the time.
    assert precision_at_k(data.labels("train")[idx.numpy()], data.labels("test")) > 0.95


@pytest.fixture
def digits_model(tmp_path):
    torch.manual_seed(0)
    model = AutoEncoder(64, hidden_dims=(32,), latent_dim=8)
    model.normalization = Normalization(mean=0.0, std=16.0)
    save_model(model, tmp_path / "model", extra={"data": "digits", "seed": 0})
    return model.eval(), tmp_path / "model"


def test_cli_search_against_a_gallery_file(digits_model, tmp_path, capsys):
    model, model_dir = digits_model
    data = load_digits(seed=0)
    np.save(tmp_path / "gallery.npy", data.x_test[:100])                 # raw, (N, 1, 8, 8)
    np.save(tmp_path / "query.npy", data.x_test[100:106].reshape(6, 64))  # raw, flat
    out = tmp_path / "res" / "nn.npz"
    rc = main(["search", str(model_dir), str(tmp_path / "query.npy"), "--gallery",
               str(tmp_path / "gallery.npy"), "--k", "4", "--metric", "l2", "--out", str(out)])
    assert rc == 0
    res = np.load(out)
    index = LatentIndex.from_model(model, data.x_test[:100].reshape(100, 64) / 16.0, "l2")
    dist, idx = index.search(embed(model, data.x_test[100:106].reshape(6, 64) / 16.0), 4)
    np.testing.assert_array_equal(res["indices"], idx.numpy())
    np.testing.assert_allclose(res["distances"], dist.numpy(), rtol=1e-6)
    assert "6 queries: 4 neighbours each by l2" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["nn.npz"]


def test_cli_search_defaults_to_the_training_data(digits_model, tmp_path):
    model, model_dir = digits_model
    data = load_digits(seed=0)
    np.save(tmp_path / "query.npy", data.x_test[:3])
    out = tmp_path / "nn.npz"
    assert main(["search", str(model_dir), str(tmp_path / "query.npy"), "--out", str(out)]) == 0
    gallery = data.inputs("train")
    _, want = LatentIndex.from_model(model, gallery).search(embed(model, data.inputs("test")[:3]),
                                                            10)
    np.testing.assert_array_equal(np.load(out)["indices"], want.numpy())


def test_cli_search_grid_for_image_models(tmp_path):
    torch.manual_seed(0)
    model = ConvAutoEncoder((1, 8, 8), channels=(4,), latent_dim=6)
    model.normalization = Normalization(mean=0.0, std=16.0)
    save_model(model, tmp_path / "conv")
    data = load_digits(seed=0)
    np.save(tmp_path / "g.npy", data.x_train[:50])
    np.save(tmp_path / "q.npy", data.x_test[:2])
    rc = main(["search", str(tmp_path / "conv"), str(tmp_path / "q.npy"), "--gallery",
               str(tmp_path / "g.npy"), "--k", "3", "--out", str(tmp_path / "nn.npz"), "--grid",
               str(tmp_path / "nn.png")])
    assert rc == 0
    assert (tmp_path / "nn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_search_grid_for_a_flat_model_of_images(digits_model, tmp_path):
    # The MLP takes flat rows; the default gallery (digits' training images) gives the shape.
    _, model_dir = digits_model
    np.save(tmp_path / "q.npy", load_digits(seed=0).x_test[:2].reshape(2, 64))
    assert main(["search", str(model_dir), str(tmp_path / "q.npy"), "--out",
                 str(tmp_path / "nn.npz"), "--grid", str(tmp_path / "nn.png")]) == 0
    assert (tmp_path / "nn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra,match", [
    (["--k", "0"], r"--k must be in \[1, 20\]"),
    (["--k", "21"], r"--k must be in \[1, 20\]"),
    (["--grid", "nn.png"], r"--grid needs images.*samples of shape \(64,\)"),
    (["--out", "nn.npy"], "--out must be a .npz file path"),
])
def test_cli_search_rejects_bad_arguments(digits_model, tmp_path, capsys, monkeypatch, extra,
                                          match):
    _, model_dir = digits_model
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "g.npy", np.zeros((20, 64), np.float32))
    np.save(tmp_path / "q.npy", np.zeros((2, 64), np.float32))
    args = ["search", str(model_dir), "q.npy", "--gallery", "g.npy"]
    args += extra if "--out" in extra else [*extra, "--out", "nn.npz"]
    assert main(args) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "nn.npz").exists()


def test_cli_search_defaults_to_the_training_split_of_the_models_own_file(tmp_path, capsys):
    from aecore import data as datasets

    rows = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    np.save(tmp_path / "my.npy", rows)
    save_model(AutoEncoder(64, hidden_dims=(8,), latent_dim=2), tmp_path / "m",
               extra={"data": str(tmp_path / "my.npy"), "seed": 3})
    np.save(tmp_path / "q.npy", rows[:2])
    np.save(tmp_path / "g.npy", datasets.load(str(tmp_path / "my.npy"), seed=3).x_train)
    args = ["search", str(tmp_path / "m"), str(tmp_path / "q.npy"), "--k", "3", "--out"]
    assert main([*args, str(tmp_path / "a.npz")]) == 0
    assert main([*args, str(tmp_path / "b.npz"), "--gallery", str(tmp_path / "g.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["indices"],
                                  np.load(tmp_path / "b.npz")["indices"])
    (tmp_path / "my.npy").unlink()
    assert main([*args, str(tmp_path / "c.npz")]) == 2
    assert "it is the model's training data; pass --gallery FILE.npy" in capsys.readouterr().err
    save_model(AutoEncoder(64, hidden_dims=(8,), latent_dim=2), tmp_path / "n")
    assert main(["search", str(tmp_path / "n"), str(tmp_path / "q.npy"), "--out",
                 str(tmp_path / "d.npz")]) == 2
    assert "--gallery is needed: the config of" in capsys.readouterr().err
