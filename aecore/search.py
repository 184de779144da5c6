"""Image search by latent similarity: an exact k-nearest-neighbour index over a model's codes.

A gallery is encoded once (:func:`embed`: the model's code, a VAE's posterior mean); queries
are encoded the same way and compared with every gallery code. The search is exact brute
force, one matmul per chunk of queries: at the sizes autoencoder codes are searched at (10^4 to
10^6 codes of 8-256 values) that is fast on CPUs and GPUs, and nothing is approximated. A chunk
holds at most ``CHUNK_SCORES`` scores, so memory stays bounded whatever the number of queries.

Metrics (distances, smallest first):

- ``cosine``: 1 - cos(q, g); codes are normalised once, a zero code has distance 1 to all.
- ``l2``: Euclidean distance, on codes centred on the gallery's mean (a translation changes
  no distance, and centring keeps the expanded form's cancelling terms small).

Both rank every code by one matmul (-cos, or |g|^2 - 2 q.g), then recompute the distances of
the best candidates from differences (|u_q - u_g|^2 / 2 of the unit codes, |q - g|) and sort
those: the distances returned are exact to float32 rounding, not the expanded forms', which
cancel badly for near-duplicates (1 - cos rounds to 0 below angles of ~3e-4) and for codes far
from the gallery's mean. The candidates are every code whose matmul score lies within the
score's float32 rounding bound of the k-th best, so rounding can't drop a true neighbour.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import numpy as np
import torch

from aecore.checks import native_order, positive_int

METRICS = ("cosine", "l2")
# float32 scores per chunk of queries (16 MiB). Each chunk reads the whole gallery once, so
# chunks must not be small; larger ones leave the caches (10000 x 60000 x 32 on a 2-core CPU:
# 2.8 s at 2**20, 1.9 s at 2**22, 3.1 s at 2**24).
CHUNK_SCORES = 1 << 22
# Candidates re-ranked from differences beyond k at least; more where the matmul's rounding
# bound says more could be among the k nearest (``_search_chunk``).
SPARE = 8
_FORMAT = "aecore.LatentIndex"


def _codes(model, x: torch.Tensor) -> torch.Tensor:
    code = model.encode(x)
    return code[0] if isinstance(code, tuple) else code  # a VAE's (mu, logvar): the mean


@torch.no_grad()
def embed(model, x: np.ndarray | torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Codes of model inputs: x (N, *input_shape), normalised as the model expects ->
    (N, latent_dim) float32 on the CPU. VAEs give their posterior mean, VQ-VAEs their continuous
    code. The model runs in eval mode (its mode is restored) on its own device."""
    batch_size = positive_int("batch_size", batch_size)
    if getattr(model, "num_classes", 0):
        raise ValueError(f"embed takes unconditional models; a {model.family!r} encodes with "
                         "labels: use model.encode(x, labels)")
    x = torch.as_tensor(native_order(x))
    model.check_input(x, "x")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or Inf")  # as fit says; its codes would be NaN
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        # In the model's dtype: float64 arrays (numpy's default) meet float32 weights.
        out = [_codes(model, x[i:i + batch_size].to(param.device, param.dtype)).float().cpu()
               for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.latent_dim)


def _matrix(codes, name: str) -> torch.Tensor:
    """codes as a finite floating (N, D) float32 tensor; errors name ``name``."""
    if isinstance(codes, np.ndarray):
        codes = torch.from_numpy(native_order(codes))
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got "
                        f"{type(codes).__name__}")
    if not codes.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {codes.dtype}")
    if codes.dim() != 2 or codes.shape[1] == 0:
        raise ValueError(f"{name} must be 2-D (N, code_dim) with code_dim >= 1, got shape "
                         f"{tuple(codes.shape)}")
    codes = codes.float().contiguous()  # before the check: float64 beyond float32's range -> inf
    if not torch.isfinite(codes).all():
        raise ValueError(f"{name} contains NaN or Inf, or values beyond float32's range")
    # Distances square the codes: squares must stay finite, with room for sums of two.
    if len(codes) and float(codes.pow(2).sum(dim=1).max()) > torch.finfo(torch.float32).max / 8:
        raise ValueError(f"{name} has codes too large to compare in float32 (squared norms "
                         f"overflow); scale them down")
    return codes


def _norms(codes: torch.Tensor) -> torch.Tensor:
    return codes.norm(dim=1, keepdim=True)


def _unit(codes: torch.Tensor) -> torch.Tensor:
    # A zero code stays zero: cosine distance 1 to everything, never NaN.
    return codes / _norms(codes).clamp_min(torch.finfo(codes.dtype).tiny)


class LatentIndex:
    """Exact nearest-neighbour search over gallery codes (N, D).

    ``search(queries, k)`` -> (distances (Q, k) float32, indices (Q, k) int64) into the gallery,
    nearest first. Build one from codes, or from a model and its inputs with :meth:`from_model`;
    :meth:`save` / :meth:`load` keep it as a safetensors file.
    """

    def __init__(self, codes: np.ndarray | torch.Tensor, metric: str = "cosine"):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        # A copy: later changes to the caller's array must not leave the index stale.
        codes = _matrix(codes, "codes").clone()
        if len(codes) == 0:
            raise ValueError("codes must hold at least one gallery code, got 0 rows")
        self.codes = codes
        self.metric = metric
        if metric == "cosine":
            self._keys = _unit(codes)
            self._zero = _norms(codes)[:, 0] < torch.finfo(torch.float32).tiny
        else:
            self._mean = codes.mean(dim=0, dtype=torch.float64).float()
            self._keys = codes - self._mean
            self._sqnorm = self._keys.pow(2).sum(dim=1)
            self._radius = float(self._sqnorm.max().sqrt())

    @classmethod
    def from_model(cls, model, x: np.ndarray | torch.Tensor, metric: str = "cosine",
                   batch_size: int = 1024) -> LatentIndex:
        """The index of ``model``'s codes of the gallery inputs x (N, *input_shape)."""
        return cls(embed(model, x, batch_size), metric)

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def dim(self) -> int:
        return self.codes.shape[1]

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest gallery codes of each query code: queries (Q, D) ->
        (distances (Q, k) float32, indices (Q, k) int64), on the index's device."""
        q = _matrix(queries, "queries").to(self.codes.device)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries must have {self.dim} values per code (the gallery's), "
                             f"got shape {tuple(q.shape)}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= len(self):
            raise ValueError(f"k must be an int in [1, {len(self)}] (the gallery size), got {k!r}")
        k = int(k)
        # Per query: N scores, and the (k + spare) x D differences of the re-ranking.
        per_query = max(len(self), min(len(self), k + SPARE) * self.dim)
        step = max(1, CHUNK_SCORES // per_query)
        dists, idx = [], []
        for i in range(0, len(q), step):
            d, j = self._search_chunk(q[i:i + step], k)
            dists.append(d)
            idx.append(j)
        if not dists:
            return q.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=q.device)
        return torch.cat(dists), torch.cat(idx)

    def _search_chunk(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Rank every code by one matmul, then re-rank candidates from differences. A float32
        # score is off by at most e = gamma * (the magnitude of its terms), so a code can be
        # among the true k nearest only if its score is within 2e of the k-th best: candidates
        # double from k + SPARE until the last one falls outside that band for every query.
        gamma = (self.dim + 8) * 2.0**-24
        if self.metric == "cosine":
            qk = _unit(q)
            score = qk @ self._keys.T  # cos, larger nearer; unit vectors: |terms| <= 1
            band, largest = 2 * gamma, True
        else:
            qk = q - self._mean
            # |q - g|^2 = |q|^2 + |g|^2 - 2 q.g; |q|^2 is the same for every g and ranks nothing.
            score = torch.addmm(self._sqnorm, qk, self._keys.T, alpha=-2.0)
            r = self._radius
            band = 2 * gamma * (r * r + 2 * r * qk.norm(dim=1))
            largest = False
        m = min(len(self), k + SPARE)
        while True:
            top, cand = torch.topk(score, m, dim=1, largest=largest)
            gap = (top[:, k - 1] - top[:, -1]) if largest else (top[:, -1] - top[:, k - 1])
            if m == len(self) or not bool((gap <= band).any()):
                break
            m = min(len(self), 2 * m)
        del score
        return self._rerank(q, cand, k)

    def _rerank(self, q: torch.Tensor, cand: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest of each query's candidates (q, m), by distances from differences:
        |q - g| (l2), |u_q - u_g|^2 / 2 = 1 - cos of the unit codes (cosine), exact where
        the expanded forms cancel. Cosine normalises in float64: float32 unit vectors would
        round away angles below ~1e-7 (a tight cluster far from the origin). Blocks of queries
        keep the (block, m, D) differences within CHUNK_SCORES."""
        step = max(1, CHUNK_SCORES // (cand.shape[1] * self.dim))
        dists, idx = [], []
        for i in range(0, len(q), step):
            c = cand[i:i + step]
            if self.metric == "cosine":
                u = _unit(q[i:i + step].double())
                d = (_unit(self.codes[c].reshape(-1, self.dim).double()).view(*c.shape, -1)
                     - u[:, None, :]).pow(2).sum(dim=2).mul_(0.5)
                zero = self._zero[c] | (_norms(q[i:i + step]) < torch.finfo(torch.float32).tiny)
                d = d.masked_fill_(zero, 1.0).clamp_(0.0, 2.0)
            else:
                d = (self.codes[c] - q[i:i + step, None, :]).pow(2).sum(dim=2)
            d, order = torch.topk(d, k, dim=1, largest=False)
            dists.append(d.float() if self.metric == "cosine" else d.sqrt_())
            idx.append(c.gather(1, order))
        return torch.cat(dists), torch.cat(idx)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the gallery codes and metric to a safetensors file, atomically."""
        from aecore.io import save_state

        return save_state(path, {"codes": self.codes},
                          metadata={"format": _FORMAT, "metric": self.metric})

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentIndex:
        """An index written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no index file at {str(p)!r}")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                codes = f.get_tensor("codes") if "codes" in f.keys() else None
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{str(p)!r} is not a safetensors file ({e})") from None
        if meta.get("format") != _FORMAT or codes is None:
            raise ValueError(f"{str(p)!r} is not a LatentIndex file (saved by LatentIndex.save)")
        return cls(codes, meta.get("metric", ""))


def precision_at_k(neighbour_labels: np.ndarray | torch.Tensor,
                   query_labels: np.ndarray | torch.Tensor) -> float:
    """Mean fraction of each query's neighbours that share its label: neighbour_labels (Q, k)
    (the gallery labels at the search's indices), query_labels (Q,) -> a float in [0, 1]."""
    nb = torch.as_tensor(neighbour_labels)
    ql = torch.as_tensor(query_labels)
    if nb.dim() != 2 or ql.dim() != 1 or len(nb) != len(ql) or len(ql) == 0 or nb.shape[1] == 0:
        raise ValueError(f"neighbour_labels must be (Q, k) and query_labels (Q,), Q, k >= 1; got "
                         f"{tuple(nb.shape)} and {tuple(ql.shape)}")
    return float((nb == ql[:, None]).double().mean())


def _gallery(model_dir: Path, record: dict, gallery: str | None,
             data_root: str | None) -> tuple[np.ndarray, str]:
    """(raw gallery samples, a description): a .npy file, or the training split of a data set
    (by default the one the model was trained on, as its :func:`~aecore.io.training_record`
    names it: a named one or the user's file)."""
    from aecore import data as datasets
    from aecore.io import load_npy

    trained_on = gallery is None
    if trained_on:
        gallery = record["data"]
        if gallery is None:
            raise ValueError(f"--gallery is needed: the config of {str(model_dir)!r} names no "
                             "training data")
    if gallery in datasets.NAMES or trained_on:
        root = data_root if data_root is not None else record["data_root"]
        try:
            data = datasets.load(gallery, root=root, seed=record["seed"],
                                 label_column=record["label_column"] if trained_on else None)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}: it is the model's training data; pass --gallery "
                                    "FILE.npy to search another set") from None
        return data.x_train, f"the {len(data.x_train)} training samples of {gallery}"
    raw = load_npy(gallery, "--gallery")
    return raw, str(gallery)


def _image_shape(input_shape: tuple[int, ...], raw_gallery: np.ndarray) -> tuple[int, ...]:
    """The (C, H, W) or (H, W) shape to draw samples in: an image model's input, else the
    gallery's own sample shape (a flat MLP of images still gets images of their shape)."""
    if len(input_shape) == 3:
        return input_shape
    sample = raw_gallery.shape[1:]
    if len(sample) == 2 or (len(sample) == 3 and sample[0] in (1, 3)):
        return tuple(sample)
    raise ValueError(f"--grid needs images: an image model, or a gallery of (N, H, W) or "
                     f"(N, C, H, W) samples; this gallery has samples of shape {tuple(sample)}")


def search_file(model_dir: str | os.PathLike, query_npy: str | os.PathLike,
                out_npz: str | os.PathLike, gallery: str | None = None, k: int = 10,
                metric: str = "cosine", grid: str | os.PathLike | None = None,
                data_root: str | None = None) -> dict[str, np.ndarray]:
    """The k nearest gallery samples of each raw query in ``query_npy``, by the codes of the
    model in ``model_dir``.

    ``gallery``: a .npy of raw samples, or a data set name (its training split); by default the
    data set the model was trained on. Writes ``out_npz`` atomically with ``indices`` (Q, k)
    int64 rows of the gallery and ``distances`` (Q, k) float32, nearest first; ``grid``: a PNG
    of the first 8 queries beside their neighbours (image data). Returns the arrays.
    """
    from aecore.io import (
        check_output,
        load_model,
        load_npy,
        model_inputs,
        training_record,
        write_npz,
    )

    model_dir = Path(model_dir)
    sources = (query_npy, gallery if gallery is not None and Path(gallery).is_file() else None)
    out_npz = check_output(out_npz, ".npz", sources)
    if grid is not None:
        grid = check_output(grid, ".png", sources, name="--grid")
    if metric not in METRICS:
        raise ValueError(f"--metric must be one of {METRICS}, got {metric!r}")
    model = load_model(model_dir)
    if getattr(model, "num_classes", 0):
        raise ValueError(f"the model in {str(model_dir)!r} is a conditional {model.family!r}: it "
                         "encodes with labels, and search takes unconditional models")
    queries = model_inputs(model, load_npy(query_npy, "query"), "query")
    raw_gallery, described = _gallery(model_dir, training_record(model_dir), gallery,
                                      data_root)
    gallery_x = model_inputs(model, raw_gallery, "--gallery")
    if grid is not None:
        image = _image_shape(tuple(model.input_shape), raw_gallery)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(gallery_x):
        raise ValueError(f"--k must be in [1, {len(gallery_x)}] (the gallery size), got {k!r}")
    index = LatentIndex.from_model(model, gallery_x, metric)
    dist, idx = index.search(embed(model, queries), k)
    result = {"indices": idx.cpu().numpy(), "distances": dist.cpu().numpy()}
    write_npz(out_npz, result)
    print(f"searched {described} for {len(queries)} queries: {k} neighbours each by {metric} "
          f"distance of {model.latent_dim}-value codes; wrote {out_npz}")
    if grid is not None:
        from aecore.plots import save_image_grid

        rows = min(8, len(queries))
        images = np.concatenate([np.concatenate([queries[r:r + 1], gallery_x[result["indices"][r]]])
                                 for r in range(rows)]).reshape(-1, *image)
        save_image_grid(images, grid, nrow=k + 1,
                        row_labels=[f"query {r}" for r in range(rows)])
        print(f"wrote {grid}")
    return result
