"""Recommendation: fold-in splits, ranking metrics against float64 oracles, the multinomial VAE,
MovieLens 100k, and the CLI."""

import math
import os

import numpy as np
import pytest
import torch

from aecore import data
from aecore.cli import main
from aecore.export import Model, VerificationError, to_onnx
from aecore.io import load_model
from aecore.recommend import (
    fold_in_split,
    item_scores,
    ndcg_at_k,
    popularity,
    ranking_report,
    recall_at_k,
    recommend,
    top_items,
)
from aecore.train import Trainer
from aecore.vae import VAE

# CI installs the data (pip install --no-deps recbole) and sets this, so that these tests run.
needs_movielens = pytest.mark.skipif(
    data.find_movielens_100k() is None and not os.environ.get("AECORE_REQUIRE_MOVIELENS"),
    reason="MovieLens 100k not installed (pip install --no-deps recbole==1.2.1)")


def _random_rows(users=40, items=30, p=0.3, seed=0):
    g = np.random.default_rng(seed)
    x = (g.random((users, items)) < p).astype(np.float32)
    x[:, :2] = 1.0  # every user has at least 2 items
    return x


def test_fold_in_split_partitions_each_row():
    x = _random_rows()
    fold, held = fold_in_split(x, holdout=0.2, seed=3)
    assert fold.shape == held.shape == x.shape
    assert not (fold * held).any()                                     # disjoint
    np.testing.assert_array_equal((fold + held).numpy(), x)           # and together the row
    n = x.sum(1)
    want = np.clip(np.round(0.2 * n), 1, n - 1)
    np.testing.assert_array_equal(held.sum(1).numpy(), want)
    again = fold_in_split(x, holdout=0.2, seed=3)
    assert torch.equal(again[1], held)
    assert not torch.equal(fold_in_split(x, holdout=0.2, seed=4)[1], held)


def test_fold_in_split_rejects_bad_rows_and_holdout():
    with pytest.raises(ValueError, match="at least 2 items each.*1 rows have fewer"):
        fold_in_split(np.array([[1, 1, 0], [0, 1, 0]], np.float32))
    with pytest.raises(ValueError, match=r"holdout must be a float in \(0, 1\)"):
        fold_in_split(_random_rows(), holdout=1.0)
    rows = _random_rows()
    assert torch.equal(fold_in_split(rows, holdout=np.float32(0.25))[1],
                       fold_in_split(rows, holdout=0.25)[1])  # numpy floats work
    with pytest.raises(ValueError, match="rows must be a 2-D"):
        fold_in_split(np.ones(5, np.float32))
    with pytest.raises(ValueError, match="finite, non-negative"):
        fold_in_split(-np.ones((2, 3), np.float32))


def _oracle(scores, fold, held, k):
    """float64 loops over users: (Recall@k, NDCG@k), fold-in items never ranked."""
    recalls, ndcgs = [], []
    for s, f, h in zip(scores, fold, held):
        order = [i for i in np.argsort(-s, kind="stable") if f[i] == 0][:k]
        hits = [float(h[i] > 0) for i in order]
        n = int(h.sum())
        recalls.append(sum(hits) / min(k, n))
        dcg = sum(r / math.log2(i + 2) for i, r in enumerate(hits))
        ndcgs.append(dcg / sum(1 / math.log2(i + 2) for i in range(min(k, n))))
    return float(np.mean(recalls)), float(np.mean(ndcgs))


@pytest.mark.parametrize("k", [1, 3, 10, 25])
def test_recall_and_ndcg_match_float64_oracle_and_sklearn(k):
    from sklearn.metrics import ndcg_score

    x = _random_rows(users=23, items=60, seed=k)
    fold, held = fold_in_split(x, seed=1)
    scores = torch.rand(x.shape, generator=torch.Generator().manual_seed(k))
    ranked = top_items(scores, fold, k)
    want_recall, want_ndcg = _oracle(scores.numpy(), fold.numpy(), held.numpy(), k)
    assert recall_at_k(ranked, held) == pytest.approx(want_recall, rel=1e-12)
    assert ndcg_at_k(ranked, held) == pytest.approx(want_ndcg, rel=1e-12)
    # scikit-learn's NDCG of the same ranking (fold-in items scored below every other item).
    masked = np.where(fold.numpy() > 0, -1.0, scores.numpy())
    assert ndcg_at_k(ranked, held) == pytest.approx(ndcg_score(held.numpy(), masked, k=k),
                                                    rel=1e-9)


def test_metrics_by_hand():
    held = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    ranked = torch.tensor([[3, 1, 0]])          # hits: miss, hit, miss
    assert recall_at_k(ranked, held) == pytest.approx(0.5)     # 1 of min(3, 2)
    assert ndcg_at_k(ranked, held) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    with pytest.raises(ValueError, match="held_out must have at least one item per user"):
        recall_at_k(ranked, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"ranked must be \(U, K\) integer item indices"):
        ndcg_at_k(ranked.float(), held)
    with pytest.raises(ValueError, match=r"K >= 1"):
        recall_at_k(ranked[:, :0], held)
    with pytest.raises(ValueError, match="must not list an item twice"):
        recall_at_k(torch.tensor([[1, 1, 0]]), held)  # would count one hit twice
    for bad in ([[4, 1, 0]], [[-1, 1, 0]]):
        with pytest.raises(ValueError, match=r"item indices in \[0, 4\)"):
            ndcg_at_k(torch.tensor(bad), held)


def test_top_items_never_returns_seen_items():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4]])
    seen = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(top_items(scores, seen, 2).numpy(), [[1, 2], [3, 2]])
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\]"):
        top_items(scores, seen, 5)
    np.testing.assert_array_equal(top_items(scores, seen, np.int64(2)).numpy(),
                                  [[1, 2], [3, 2]])  # numpy ints work
    with pytest.raises(ValueError, match="seen must have the shape of the scores"):
        top_items(scores, seen[:1], 2)
    with pytest.raises(ValueError, match="k=3 is more than some user's unseen items"):
        top_items(scores, seen, 3)
    np.testing.assert_array_equal(top_items(scores, seen > 0, 2).numpy(), [[1, 2], [3, 2]])
    # Log-probability scores may be -inf: such an item still ranks ahead of every seen one.
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0]]))
    np.testing.assert_array_equal(
        top_items(logp, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]), 3)[0, :1].numpy(), [2])
    assert set(top_items(logp, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]), 3)[0].tolist()) == {
        2, 3, 4}
    with pytest.raises(ValueError, match="scores must not be NaN"):
        top_items(torch.tensor([[0.1, float("nan")]]), None, 1)


def test_popularity_counts_users():
    rows = np.array([[1, 0, 2], [1, 0, 0], [0, 0, 1]], np.float32)
    np.testing.assert_array_equal(popularity(rows).numpy(), [2, 0, 2])


def test_multinomial_vae_likelihood_and_normalised_encoder():
    torch.manual_seed(0)
    model = VAE(12, hidden_dims=(8,), latent_dim=3, activation="tanh", likelihood="multinomial",
                beta=0.2).double()
    x = torch.tensor(_random_rows(5, 12), dtype=torch.float64)
    raw = torch.randn(5, 12, dtype=torch.float64)
    want = (x * (raw - torch.logsumexp(raw, 1, keepdim=True))).sum(1)
    torch.testing.assert_close(model.log_px(raw, x), want)
    probs = model.decode(torch.randn(5, 3, dtype=torch.float64))
    torch.testing.assert_close(probs.sum(1), torch.ones(5, dtype=torch.float64))
    # The encoder sees x / ||x||: a user's row scaled by 3 has the same posterior.
    torch.testing.assert_close(model.encode(3 * x)[0], model.encode(x)[0])
    assert torch.isfinite(model.encode(torch.zeros(1, 12, dtype=torch.float64))[0]).all()
    out = {k: float(v.detach()) for k, v in model.loss(x).items()}
    assert math.isfinite(out["loss"])
    assert out["loss"] == pytest.approx(out["recon"] + 0.2 * out["kl"], rel=1e-12)
    assert VAE(**model.config()).likelihood == "multinomial"


def test_multinomial_vae_exports_and_verifies(tmp_path):
    torch.manual_seed(0)
    model = VAE(30, hidden_dims=(16,), latent_dim=4, activation="tanh",
                likelihood="multinomial").eval()
    for part in ("autoencoder", "encoder"):
        to_onnx(model, tmp_path / f"{part}.onnx", part=part)  # ORT + onnx.reference vs torch
        assert (tmp_path / f"{part}.onnx").is_file()


@pytest.mark.parametrize("family", ["vae", "ae"])
def test_recommender_part_matches_recommend_in_onnx_runtime(tmp_path, family):
    from aecore.autoencoder import AutoEncoder

    torch.manual_seed(0)
    model = (VAE(40, hidden_dims=(16,), latent_dim=4, activation="tanh",
                 likelihood="multinomial") if family == "vae"
             else AutoEncoder(40, hidden_dims=(16,), latent_dim=4)).eval()
    path = to_onnx(model, tmp_path / "rec.onnx", part="recommender", k=6)
    runtime = Model(path)
    assert runtime.output_names == ["items", "scores"] and runtime.metadata["k"] == 6
    for batch in (1, 257):
        history = _random_rows(batch, 40, seed=batch)
        out = runtime.run_all(history)
        items, scores = recommend(model, history, k=6)
        assert out["items"].dtype == np.int64
        np.testing.assert_array_equal(out["items"], items.numpy())
        np.testing.assert_allclose(out["scores"], scores.numpy(), rtol=1e-5, atol=1e-7)
    # A user with fewer than k unseen items gets the rest as item -1 scored -inf, never as a
    # seen item.
    full = np.ones((2, 40), np.float32)
    full[0, :2] = 0.0
    out = runtime.run_all(full)
    assert set(out["items"][0, :2]) == {0, 1} and np.isneginf(out["scores"][0, 2:]).all()
    assert (out["items"][0, 2:] == -1).all() and (out["items"][1] == -1).all()


def test_recommender_part_rejects_bad_k_and_models_and_disagreeing_graphs(tmp_path):
    from aecore.conv import ConvAutoEncoder
    from aecore.export import onnx_export

    torch.manual_seed(0)
    model = VAE(20, hidden_dims=(8,), latent_dim=3, likelihood="multinomial").eval()
    for k in (0, 21, 2.0):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 20\]"):
            to_onnx(model, tmp_path / "r.onnx", part="recommender", k=k)
    with pytest.raises(ValueError, match="part='recommender' needs a model of flat interaction"):
        to_onnx(ConvAutoEncoder((1, 8, 8), channels=(4,), latent_dim=3), tmp_path / "r.onnx",
                part="recommender")
    assert not (tmp_path / "r.onnx").exists()
    # Verification compares items by torch's scores: another model's graph must fail it.
    import onnx

    proto = onnx.load_from_string(onnx_export._export(model, "recommender", 20, None, False,
                                                      (3, 5), 4))
    other = VAE(20, hidden_dims=(8,), latent_dim=3, likelihood="multinomial").eval()
    feeds = [onnx_export._examples(other, "recommender", 6, torch.Generator().manual_seed(1))]
    with pytest.raises(VerificationError, match="items that torch does not rank in its top k"):
        onnx_export.verify(proto, onnx_export._Part(other, "recommender", None, 4), feeds, ["x"])


def test_recommend_ranks_unseen_items_by_the_models_scores():
    torch.manual_seed(0)
    model = VAE(30, hidden_dims=(16,), latent_dim=4, likelihood="multinomial").eval()
    history = _random_rows(6, 30)
    items, scores = recommend(model, history.astype(np.float64), k=5)  # float64 rows work too
    assert items.shape == scores.shape == (6, 5)
    full = item_scores(model, history)
    for u in range(6):
        assert not history[u, items[u].numpy()].any()
        unseen = full[u][torch.from_numpy(history[u] == 0)]
        torch.testing.assert_close(scores[u], unseen.topk(5).values)


def test_recommenders_normalise_raw_rows_and_mask_what_the_user_saw(tmp_path):
    # A model trained on standardised rows: recommend and the ONNX part take raw rows, mask
    # raw x > 0 and give the model normalised inputs. Item 0 is in every history (mean 1,
    # std 1: normalised to 0) and must never come back.
    from aecore.autoencoder import AutoEncoder
    from aecore.normalization import Normalization

    torch.manual_seed(0)
    rows = _random_rows(50, 12, seed=3)
    rows[:, 0] = 1.0
    mean, std = rows.mean(0), rows.std(0) + 1.0
    model = AutoEncoder(12, hidden_dims=(8,), latent_dim=3).eval()
    model.normalization = Normalization(mean=mean.tolist(), std=std.tolist())
    items, scores = recommend(model, rows, k=3)
    with torch.no_grad():
        # Scores in the rows' units: the reconstruction mapped back.
        want = model(torch.from_numpy((rows - mean) / std).float()) * torch.from_numpy(
            std).float() + torch.from_numpy(mean).float()
    torch.testing.assert_close(item_scores(model, rows), want)
    torch.testing.assert_close(item_scores(model, rows, batch_size=7), want)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        item_scores(model, rows, batch_size=0)
    assert not (rows[np.arange(50)[:, None], items.numpy()] > 0).any()
    runtime = Model(to_onnx(model, tmp_path / "rec.onnx", part="recommender", k=3))
    assert runtime.metadata["normalization"] is None  # the graph normalises
    out = runtime.run_all(rows)
    np.testing.assert_array_equal(out["items"], items.numpy())
    np.testing.assert_allclose(out["scores"], scores.numpy(), rtol=1e-5, atol=1e-6)


def test_quantized_recommender_reports_the_error_of_its_scores(tmp_path):
    from aecore.export import quantize

    torch.manual_seed(0)
    model = VAE(40, hidden_dims=(16,), latent_dim=4, activation="tanh",
                likelihood="multinomial").eval()
    src = to_onnx(model, tmp_path / "rec.onnx", part="recommender", k=5)
    rows = (np.random.default_rng(0).random((64, 40)) < 0.2).astype(np.float32)
    report = quantize(src, tmp_path / "rec-int8.onnx", mode="dynamic", inputs=rows)
    want = Model(src).run_all(rows)["scores"]
    got = Model(tmp_path / "rec-int8.onnx").run_all(rows)["scores"]
    assert np.isfinite(want).all()
    assert report["max_abs_error"] == pytest.approx(float(np.abs(got - want).max()), rel=1e-6)
    # By default the report runs 0/1 rows too (random [0, 1) inputs would mark every item
    # seen and leave nothing but -inf scores to compare).
    default = quantize(src, tmp_path / "rec-int8.onnx", mode="dynamic")
    assert 0 < default["max_abs_error"] < 1


def test_static_int8_recommender_keeps_its_rankings(tmp_path):
    """Static int8 quantizes the recommender's layers, not their outputs: with its softmax's
    input (the last layer's scores) quantized too, close scores became ties (96.8% of the
    top-10 items kept here, 72% on MovieLens with the softmax itself quantized)."""
    import onnx

    from aecore.export import quantize

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    popularity = rng.random(300) ** 3  # a few popular items, a long tail, as in real data
    rows = (rng.random((1024, 300)) < 0.3 * popularity).astype(np.float32)
    model = VAE(300, hidden_dims=(64,), latent_dim=8, activation="tanh",
                likelihood="multinomial")
    Trainer(model, epochs=5, lr=1e-2, batch_size=128, progress=False).fit(
        torch.from_numpy(rows[:768]))
    src = to_onnx(model.eval(), tmp_path / "rec.onnx", part="recommender", k=10)
    report = quantize(src, tmp_path / "rec-int8.onnx", mode="static", calibration=rows[:256],
                      inputs=rows[768:])
    graph = onnx.load(str(tmp_path / "rec-int8.onnx")).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    softmax = next(node for node in graph.node if node.op_type == "Softmax")
    assert made_by[softmax.input[0]] == "Gemm"  # float scores, no Quantize/DequantizeLinear
    assert report["topk_overlap"] > 0.98


def test_movielens_loader_reads_grouplens_files_and_rejects_others(tmp_path):
    lines = [f"{u}\t{i}\t{r}\t88125{u}{i}" for u, i, r in
             [(1, 1, 5), (1, 2, 4), (1, 3, 3), (1, 4, 5), (1, 5, 4), (1, 6, 4),
              (2, 1, 4), (2, 3, 5), (2, 4, 4), (2, 5, 5), (2, 6, 5), (3, 2, 5)]]
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    ds = data.load_movielens_100k(tmp_path, test_fraction=0.5)
    assert ds.interactions and ds.sample_shape == (6,)
    rows = {tuple(r) for r in np.concatenate([ds.x_train, ds.x_test]).tolist()}
    assert rows == {(1, 1, 0, 1, 1, 1), (1, 0, 1, 1, 1, 1)}  # user 3 has 1 positive: dropped
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "u.data").write_text("user item rating\nnot numbers here\n")
    with pytest.raises(ValueError, match="expected tab-separated user, item, rating"):
        data.load_movielens_100k(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps recbole"):
        data.load_movielens_100k(tmp_path / "missing")
    for item, match in (("2.7", "integer ids >= 1"), ("nan", "integer ids >= 1"),
                        ("inf", "integer ids >= 1"), ("99999999999", "exceeds 1000000")):
        (tmp_path / "bad" / "u.data").write_text("\n".join([*lines, f"3\t{item}\t5\t0"]))
        with pytest.raises(ValueError, match=match):
            data.load_movielens_100k(tmp_path / "bad")
    (tmp_path / "bad" / "u.data").write_bytes(b"\x93\xff\x00binary")
    with pytest.raises(ValueError, match="u.data: not a text file"):
        data.load_movielens_100k(tmp_path / "bad")


def test_movielens_named_by_the_environment_is_the_only_place_looked_in(tmp_path,
                                                                         monkeypatch):
    # A folder the user named never quietly gives way to recbole's copy (as for Fashion-MNIST).
    monkeypatch.setenv("AECORE_MOVIELENS", str(tmp_path / "missing"))
    assert data.find_movielens_100k() is None
    with pytest.raises(FileNotFoundError, match=f"MovieLens 100k not found in "
                                                f"'{tmp_path / 'missing'}'"):
        data.load_movielens_100k()
    lines = [f"{u}\t{i}\t5\t0" for u in (1, 2) for i in range(1, 7)]
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("AECORE_MOVIELENS", str(tmp_path))
    assert data.find_movielens_100k() == tmp_path / "u.data"


@needs_movielens
def test_movielens_100k_is_the_real_data_set():
    ds = data.load("movielens-100k")
    x = np.concatenate([ds.x_train, ds.x_test])
    # 943 users x 1682 movies, 55375 ratings of 4 or 5; users with 5 or more of them: 938.
    assert x.shape == (938, 1682) and ds.x_test.shape[0] == round(938 * 0.2)
    assert set(np.unique(x)) == {0.0, 1.0} and (x.sum(1) >= 5).all()
    assert int(x.sum()) == 55375 - 14  # the 14 positives of the 5 dropped users


@needs_movielens
def test_mult_vae_on_movielens_beats_popularity():
    from aecore.corruption import Masking
    from aecore.train import Trainer

    ds = data.load("movielens-100k")
    torch.manual_seed(0)
    model = VAE(1682, hidden_dims=(200,), latent_dim=50, activation="tanh",
                likelihood="multinomial", beta=0.2)
    Trainer(model, lr=1e-3, batch_size=128, epochs=40, seed=0, corruption=Masking(0.5),
            progress=False).fit(ds.x_train)
    report = ranking_report(model, ds.x_test, ds.x_train)
    assert report["ndcg@100"] > report["popularity_ndcg@100"] + 0.05, report
    assert report["recall@20"] > report["popularity_recall@20"] + 0.05, report


@needs_movielens
def test_cli_trains_a_recommender_and_recommends(tmp_path, capsys):
    out = tmp_path / "mv"
    assert main(["train", "--model", "vae", "--data", "movielens-100k", "--epochs", "2",
                 "--hidden", "32", "--latent", "8", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "recall@20=" in printed and "popularity_ndcg@100=" in printed
    model = load_model(out)
    assert model.likelihood == "multinomial" and model.beta == pytest.approx(0.2)
    history = data.load("movielens-100k").x_test[:4]
    np.save(tmp_path / "h.npy", history)
    assert main(["recommend", str(out), str(tmp_path / "h.npy"), "--k", "7", "--out",
                 str(tmp_path / "r.npz")]) == 0
    recs = np.load(tmp_path / "r.npz")
    assert recs["items"].shape == (4, 7)
    assert not np.take_along_axis(history, recs["items"], 1).any()
    assert main(["export", str(out), "--part", "recommender", "--k", "7", "--out",
                 str(tmp_path / "rec.onnx")]) == 0
    assert main(["infer", str(tmp_path / "rec.onnx"), str(tmp_path / "h.npy"), "--out",
                 str(tmp_path / "items.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "items.npy"), recs["items"])
    np.testing.assert_allclose(np.load(tmp_path / "items.scores.npy"), recs["scores"], rtol=1e-5)
    np.save(tmp_path / "bad.npy", np.ones((2, 5), np.float32))
    assert main(["recommend", str(out), str(tmp_path / "bad.npy"), "--out",
                 str(tmp_path / "r2.npz")]) == 2
    assert "history must hold interaction rows of 1682 items" in capsys.readouterr().err


def test_standardised_items_are_ranked_in_the_rows_units(tmp_path):
    # A model that reconstructs every row as the average row (0 in standardised units) must
    # recommend the most used items first, not whichever items rounding favours.
    from aecore.autoencoder import AutoEncoder
    from aecore.normalization import Normalization

    model = AutoEncoder(6, hidden_dims=(4,), latent_dim=2).eval()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    mean = [0.05, 0.6, 0.2, 0.9, 0.01, 0.4]
    model.normalization = Normalization(mean=mean, std=[0.1, 0.5, 0.3, 0.2, 0.05, 0.4])
    history = np.zeros((2, 6), np.float32)
    history[1, 3] = 1.0  # the most used item, already seen by user 1
    items, scores = recommend(model, history, k=3)
    assert items.tolist() == [[3, 1, 5], [1, 5, 2]]
    torch.testing.assert_close(scores, torch.tensor([[0.9, 0.6, 0.4], [0.6, 0.4, 0.2]]))
    out = Model(to_onnx(model, tmp_path / "rec.onnx", part="recommender", k=3)).run_all(history)
    assert out["items"].tolist() == items.tolist()
    np.testing.assert_allclose(out["scores"], scores.numpy(), rtol=1e-6)


def test_items_nobody_used_in_training_are_not_recommended(tmp_path):
    # Columns constant in training keep std 1, so a model's output there (an under-trained
    # model's noise) used to map back to raw scores like real items'. They come back as their
    # training value, 0: behind every item the model scores above it.
    from aecore.autoencoder import AutoEncoder
    from aecore.normalization import Normalization

    torch.manual_seed(0)
    rows = _random_rows(60, 8, seed=5)
    rows[:, [2, 6]] = 0.0  # never used
    model = AutoEncoder(8, hidden_dims=(6,), latent_dim=2).eval()
    torch.nn.init.constant_(model.decoder.layers[-1].bias, 3.0)  # a loud output everywhere
    model.normalization = Normalization.fit(rows)
    assert model.normalization.constant == [0, 1, 2, 6]  # items 0 and 1: in every history
    scores = item_scores(model, rows)
    assert (scores[:, [0, 1]] == 1).all() and (scores[:, [2, 6]] == 0).all()
    assert (scores[:, [3, 4, 5, 7]] > 0).all()
    items, scores = recommend(model, np.zeros((1, 8), np.float32), k=6)
    assert sorted(items[0].tolist()) == [0, 1, 3, 4, 5, 7]
    out = Model(to_onnx(model, tmp_path / "rec.onnx", part="recommender", k=6)).run_all(
        np.zeros((1, 8), np.float32))
    assert sorted(out["items"][0].tolist()) == [0, 1, 3, 4, 5, 7]  # 0 and 1 tie, at 1.0
    np.testing.assert_allclose(out["scores"], scores, rtol=1e-6)


def test_big_endian_histories_recommend_as_native_ones(tmp_path):
    # torch takes no other byte order than the machine's: a '>f4' file failed with torch's
    # "byte order different from the native byte order".
    from aecore.autoencoder import AutoEncoder
    from aecore.io import save_model
    from aecore.recommend import recommend_file

    torch.manual_seed(0)
    save_model(AutoEncoder(12, hidden_dims=(8,), latent_dim=3).eval(), tmp_path / "m",
               extra={"data": "history.csv"})
    rows = _random_rows(6, 12, seed=2)
    np.save(tmp_path / "le.npy", rows)
    np.save(tmp_path / "be.npy", rows.astype(">f4"))
    want = recommend_file(tmp_path / "m", tmp_path / "le.npy", tmp_path / "le.npz", k=4)
    got = recommend_file(tmp_path / "m", tmp_path / "be.npy", tmp_path / "be.npz", k=4)
    for key in ("items", "scores"):
        np.testing.assert_array_equal(got[key], want[key])
    # In memory too: the Trainer, embed and search take such arrays as they take native ones.
    from aecore.search import LatentIndex, embed
    from aecore.train import Trainer

    model = AutoEncoder(12, hidden_dims=(8,), latent_dim=3)
    hist = Trainer(model, epochs=1, batch_size=4, progress=False, val_fraction=0).fit(
        rows.astype(">f4"))
    assert len(hist) == 1
    codes = embed(model, rows.astype(">f4"))
    torch.testing.assert_close(codes, embed(model, rows))
    assert LatentIndex(codes.numpy().astype(">f4")).search(codes[:2], 1)[1].tolist() == [[0], [1]]
