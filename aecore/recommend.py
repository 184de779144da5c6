"""Recommendation: rank the items a user has not interacted with by a model's reconstruction of
the user's interaction row, and score rankings as the field does.

Rows are users, (U, I) with 1 where the user interacted with the item (``x > 0``). Any aecore
model that reconstructs such rows recommends; the one made for it is the VAE with a
multinomial likelihood, trained on masked rows (``aecore train --model vae --data
movielens-100k``: the Mult-VAE of Liang et al., "Variational Autoencoders for Collaborative
Filtering", WWW 2018).

Evaluation follows that paper's strong generalisation: models train on the training users'
rows; each held-out user's items are split at random into fold-in items (the model's input)
and held-out items (``holdout`` of them, at least one); every item outside the fold-in set is
ranked, and the top K is compared with the held-out items:

- Recall@K = |top K and held out| / min(K, |held out|), so that a perfect ranking scores 1;
- NDCG@K = DCG@K / IDCG@K, DCG@K = sum over ranks r < K of [item r is held out] / log2(r + 2),
  IDCG@K the DCG of min(K, |held out|) hits in a row.

Ranking items by their number of training users (:func:`popularity`) is the baseline that every
recommender has to beat.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence

import numpy as np
import torch

from aecore.checks import native_order, positive_int


def _rows(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """x as a finite, non-negative (U, I) float32 tensor; errors name ``name``."""
    x = torch.as_tensor(native_order(x))
    if x.dim() != 2 or x.is_complex():
        raise ValueError(f"{name} must be a 2-D (users, items) array of interactions, got "
                         f"shape {tuple(x.shape)} and dtype {x.dtype}")
    x = x.float()
    if not torch.isfinite(x).all() or (x < 0).any():
        raise ValueError(f"{name} must hold finite, non-negative interaction values")
    return x


def fold_in_split(rows: np.ndarray | torch.Tensor, holdout: float = 0.2, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each user's items at random: rows (U, I) -> (fold_in, held_out), both (U, I) 0/1
    with disjoint items. round(holdout * n) of a user's n items are held out, at least one and
    at most n - 1; every row needs at least 2 items."""
    x = _rows(rows, "rows") > 0
    if isinstance(holdout, bool) or not (isinstance(holdout, numbers.Real)
                                         and 0.0 < holdout < 1.0):
        raise ValueError(f"holdout must be a float in (0, 1), got {holdout!r}")
    counts = x.sum(1)
    if (counts < 2).any():
        raise ValueError(f"rows must have at least 2 items each (one to fold in, one to hold "
                         f"out); {int((counts < 2).sum())} rows have fewer")
    g = torch.Generator().manual_seed(seed)
    # A random key per item; a user's n_out items with the smallest keys are held out.
    keys = torch.rand(x.shape, generator=g).masked_fill_(~x, 2.0)
    n_out = (counts.double() * holdout).round().clamp(min=1).minimum(counts - 1).long()
    rank = keys.argsort(1).argsort(1)
    held = x & (rank < n_out[:, None])
    return (x & ~held).float(), held.float()


@torch.no_grad()
def item_scores(model, rows: np.ndarray | torch.Tensor, batch_size: int = 1024,
                name: str = "rows") -> torch.Tensor:
    """The model's reconstruction of raw interaction rows (U, I) -> scores (U, I) float32 on
    the CPU (a multinomial VAE: item probabilities). The rows go through the model's
    normalization, if it has one, as in training, and the reconstruction back: scores are in
    the rows' units (per-item standardised scores would rank rarely used items first). Eval
    mode, restored after."""
    batch_size = positive_int("batch_size", batch_size)
    if getattr(model, "num_classes", 0):
        raise ValueError(f"recommendations come from unconditional models; a "
                         f"{model.family!r} reconstructs rows with labels")
    x = _rows(rows, name)
    model.check_input(x, name)
    norm = getattr(model, "normalization", None)
    if norm is not None:
        norm.check_fits(model.input_shape, "model.normalization")
        x = torch.from_numpy(norm.apply(x.numpy()))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        out = [model(x[i:i + batch_size].to(param.device, param.dtype)).float().cpu()
               for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    scores = torch.cat(out) if out else x.new_empty(x.shape)
    return scores if norm is None else torch.from_numpy(norm.invert(scores.numpy()))


def top_items(scores: torch.Tensor, seen: np.ndarray | torch.Tensor | None, k: int
              ) -> torch.Tensor:
    """The k best-scored items of each row that the user has not seen: scores (U, I), seen
    (U, I) interactions (0/1, counts or bool) or None -> item indices (U, k) int64, best first.
    Scores may be -inf (never ahead of an item scored higher, always ahead of a seen one), not
    NaN. Every user must have at least k unseen items."""
    scores = torch.as_tensor(scores).float()
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (users, items), got shape {tuple(scores.shape)}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) \
            or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be an int in [1, {scores.shape[1]}] (the number of items), "
                         f"got {k!r}")
    k = int(k)
    if torch.isnan(scores).any() or (scores == float("inf")).any():
        raise ValueError("scores must not be NaN or +inf")
    if seen is None:
        return torch.topk(scores, k, dim=1).indices
    seen = _rows(seen, "seen") > 0
    if seen.shape != scores.shape:
        raise ValueError(f"seen must have the shape of the scores {tuple(scores.shape)}, "
                         f"got {tuple(seen.shape)}")
    if len(seen) and int(seen.sum(1).max()) > scores.shape[1] - k:
        raise ValueError(f"k={k} is more than some user's unseen items (a user has seen "
                         f"{int(seen.sum(1).max())} of {scores.shape[1]})")
    # Ranked by (unseen first, then score): an unseen item scored -inf still precedes every
    # seen one. float64 holds every float32 score exactly, with room below them for the seen.
    key = scores.double().clamp_(min=torch.finfo(torch.float32).min)
    return torch.topk(key.masked_fill_(seen, float("-inf")), k, dim=1).indices


def recommend(model, history: np.ndarray | torch.Tensor, k: int = 10, name: str = "history"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k items to recommend to each user: history (U, I) raw interactions -> (items (U, k)
    int64, scores (U, k)), best first, never an item already in the user's history."""
    scores = item_scores(model, history, name=name)
    items = top_items(scores, history, k)
    return items, scores.gather(1, items)


def _hits(ranked: torch.Tensor, held_out: np.ndarray | torch.Tensor) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    held = _rows(held_out, "held_out") > 0
    ranked = torch.as_tensor(ranked)
    if (ranked.dim() != 2 or len(ranked) != len(held) or ranked.shape[1] == 0
            or ranked.dtype.is_floating_point or ranked.dtype == torch.bool
            or ranked.is_complex()):
        raise ValueError(f"ranked must be (U, K) integer item indices, K >= 1, for the "
                         f"{len(held)} users, got shape {tuple(ranked.shape)} and dtype "
                         f"{ranked.dtype}")
    ranked = ranked.long()
    if ranked.numel() and (int(ranked.min()) < 0 or int(ranked.max()) >= held.shape[1]):
        raise ValueError(f"ranked must hold item indices in [0, {held.shape[1]}), got values in "
                         f"[{int(ranked.min())}, {int(ranked.max())}]")
    if ranked.shape[1] > 1 and (ranked.sort(1).values.diff(dim=1) == 0).any():
        raise ValueError("ranked must not list an item twice in one row")
    n = held.sum(1)
    if (n == 0).any():
        raise ValueError("held_out must have at least one item per user")
    return held.gather(1, ranked).double(), n


def recall_at_k(ranked: torch.Tensor, held_out: np.ndarray | torch.Tensor) -> float:
    """Mean Recall@K over users (K = ranked's width): ranked (U, K) item indices, held_out
    (U, I) 0/1."""
    hits, n = _hits(ranked, held_out)
    return float((hits.sum(1) / n.clamp(max=hits.shape[1])).mean())


def ndcg_at_k(ranked: torch.Tensor, held_out: np.ndarray | torch.Tensor) -> float:
    """Mean NDCG@K over users (K = ranked's width): ranked (U, K) item indices, held_out
    (U, I) 0/1."""
    hits, n = _hits(ranked, held_out)
    discount = 1.0 / torch.log2(torch.arange(hits.shape[1], dtype=torch.float64) + 2.0)
    ideal = discount.cumsum(0)[n.clamp(max=hits.shape[1]) - 1]
    return float(((hits * discount).sum(1) / ideal).mean())


def popularity(train_rows: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Items' number of training users, (I,): the popularity baseline's scores."""
    return (_rows(train_rows, "train_rows") > 0).sum(0).float()


def ranking_metrics(scores: torch.Tensor, fold_in: torch.Tensor, held_out: torch.Tensor,
                    recall_ks: Sequence[int] = (20, 50), ndcg_k: int = 100) -> dict[str, float]:
    """{"recall@K" for each K, "ndcg@K"} of scores (U, I) (fold-in items excluded)."""
    ranked = top_items(scores, fold_in, max([*recall_ks, ndcg_k]))
    out = {f"recall@{k}": recall_at_k(ranked[:, :k], held_out) for k in recall_ks}
    out[f"ndcg@{ndcg_k}"] = ndcg_at_k(ranked[:, :ndcg_k], held_out)
    return out


def ranking_report(model, test_rows: np.ndarray, train_rows: np.ndarray | None = None,
                   holdout: float = 0.2, seed: int = 0) -> dict[str, float]:
    """Recall@20, Recall@50 and NDCG@100 of ``model`` on held-out users' rows (U, I) (a
    :func:`fold_in_split` with ``seed``), and, given the training rows, the popularity
    baseline's (``popularity_`` keys)."""
    fold, held = fold_in_split(test_rows, holdout, seed)
    report = ranking_metrics(item_scores(model, fold), fold, held)
    if train_rows is not None:
        pop = popularity(train_rows).expand(len(fold), -1)
        report.update({f"popularity_{k}": v
                       for k, v in ranking_metrics(pop, fold, held).items()})
    return report


def check_trained_on_interactions(model_dir: str | os.PathLike) -> None:
    """ValueError when the model in ``model_dir`` was trained on a named data set of other
    samples than interaction rows (a user's own table may hold either: it passes)."""
    from aecore import data as datasets
    from aecore.io import training_record

    data = training_record(model_dir)["data"]
    if data in datasets.NAMES and data not in datasets.INTERACTIONS:
        raise ValueError(f"the model in {str(model_dir)!r} was trained on {data!r}, not on "
                         "(users, items) interaction rows: recommend with a model trained on "
                         f"{', '.join(datasets.INTERACTIONS)} or a table of your own")


def recommend_file(model_dir: str | os.PathLike, history_npy: str | os.PathLike,
                   out_npz: str | os.PathLike, k: int = 10) -> dict[str, np.ndarray]:
    """Recommend k items to each user of ``history_npy`` ((U, I) or one (I,) interaction row)
    with the model saved in ``model_dir``; writes ``out_npz`` atomically with ``items`` (U, k)
    int64 column indices and ``scores`` (U, k) float32, best first. Returns the arrays."""
    from aecore.io import check_output, load_model, load_npy, write_npz

    out_npz = check_output(out_npz, ".npz", (history_npy,))
    model = load_model(model_dir)
    check_trained_on_interactions(model_dir)
    raw = load_npy(history_npy, "history")
    rows = raw[None] if raw.ndim == 1 else raw
    if len(model.input_shape) != 1:
        raise ValueError(f"recommend needs a model of flat (users, items) interaction rows; "
                         f"the one in {str(model_dir)!r} takes inputs of shape "
                         f"{tuple(model.input_shape)}")
    if rows.ndim != 2 or rows.shape[1:] != tuple(model.input_shape) or len(rows) == 0:
        raise ValueError(f"history must hold interaction rows of {model.input_shape[0]} items, "
                         f"got an array of shape {raw.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= rows.shape[1]:
        raise ValueError(f"--k must be an int in [1, {rows.shape[1]}] (the number of items), "
                         f"got {k!r}")
    items, scores = recommend(model, rows, k)
    result = {"items": items.numpy(), "scores": scores.numpy()}
    write_npz(out_npz, result)
    print(f"recommended {k} items to each of {len(rows)} users; wrote {out_npz}")
    return result

