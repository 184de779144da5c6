"""Export aecore models to one self-contained, verified ONNX file.

Parts: ``autoencoder`` (x -> reconstruction), ``encoder`` (x -> code; mu and logvar for VAEs;
for the VQ-VAE the quantized code z, what its decoder takes, and the int64 code indices
(B, num_latents), what a compressed file stores), ``decoder`` (code -> reconstruction),
``code_decoder`` (the VQ-VAE's int64 code indices (B, num_latents) -> reconstruction: what
decompresses a stored file; an index outside [0, num_codes) gives a NaN reconstruction, and the
runtimes refuse one before running),
``generator`` (noise -> sample, for models with a prior; the noise is an input so results are
reproducible), ``scorer`` (x -> per-sample reconstruction error and an is-anomaly flag against a
threshold) and ``recommender`` (a user's interaction row (B, I) -> the ``k`` items the user has
not interacted with that score highest in the reconstruction, int64 (B, k), and their scores,
best first; a user with fewer than k unseen items gets item -1 with score -inf in the slots
left). Conditional models take int64 labels as a second input.
"""

from __future__ import annotations

import io
import json
import logging
import math
import numbers
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from aecore.io import write_bytes

PARTS = ("autoencoder", "encoder", "decoder", "code_decoder", "generator", "scorer",
         "recommender")
STANDARD_DOMAINS = ("", "ai.onnx")


class VerificationError(ValueError):
    """The exported graph disagrees with torch; no file was written."""


def _conditional(model) -> bool:
    return bool(getattr(model, "num_classes", None)) and getattr(model, "family", "") == "cvae"


def _has_prior(model) -> bool:
    return callable(getattr(model, "sample", None)) and getattr(model, "family", "") in (
        "vae", "cvae")


class _Part(nn.Module):
    """One exportable view of a model; ``forward`` takes (x[, y]) tensors."""

    def __init__(self, model, part: str, threshold: float | None, k: int | None = None):
        super().__init__()
        self.model, self.part, self.threshold, self.k = model, part, threshold, k
        self.cond = _conditional(model)
        norm = getattr(model, "normalization", None)
        if part == "recommender" and norm is not None:
            # The recommender takes raw rows: "seen" is x > 0 in raw units, so the model's
            # normalization runs in the graph, after the mask is taken.
            self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32))
            self.register_buffer("std", torch.tensor(norm.std, dtype=torch.float32))
            self.register_buffer("out_std", torch.from_numpy(norm.invert_scale()))
        else:
            self.mean = self.std = self.out_std = None

    def item_scores(self, x):
        """The recommender's scores (B, I) of raw rows x (B, I): the reconstruction in the
        rows' units (as aecore.recommend.item_scores), -inf on items already seen."""
        if self.mean is None:
            scores = self.model(x)
        else:
            scores = self.model((x - self.mean) / self.std) * self.out_std + self.mean
        return scores.masked_fill(x > 0, float("-inf"))

    def forward(self, x, y=None):
        m, extra = self.model, ((y,) if self.cond else ())
        if self.part == "recommender":
            scores, items = torch.topk(self.item_scores(x), self.k, dim=1)
            # Slots past a user's unseen items hold no recommendation: item -1, not a seen
            # one. Those are the -inf scores (seen items; a model's own scores are finite).
            return items.masked_fill(scores == float("-inf"), -1), scores
        if self.part == "autoencoder":
            return m(x, *extra)
        if self.part == "encoder":
            return _encode(m, x, *extra)
        if self.part in ("decoder", "generator"):
            return m.decode(x, *extra)
        if self.part == "code_decoder":
            out = m.decode(m._lookup(x))
            # A sample with an index outside the codebook is NaN. Masked on the output, after
            # the last layer: a NaN code would poison an int8 variant's dynamic quantization
            # scale, and with it every sample of the batch.
            bad = ~((x >= 0) & (x < m.num_codes)).all(1)
            return out.masked_fill(bad.view(-1, *[1] * (out.dim() - 1)), float("nan"))
        err = m.reconstruction_error(x, *extra)
        # Not (err <= threshold) rather than err > threshold: a NaN score (a corrupt sample)
        # is flagged, not passed as normal.
        return err, ~(err <= self.threshold)


def _encode(model, x, *extra):
    """The encoder part's outputs: the code (mu, logvar for VAEs); for the VQ-VAE the
    quantized code and the code indices, so that the decoder part continues from them."""
    if model.family == "vq-vae":
        return model.quantize(model.encode(x))
    return model.encode(x, *extra)


def _io_names(model, part: str, n_outputs: int) -> tuple[list[str], list[str]]:
    first = {"autoencoder": "x", "encoder": "x", "scorer": "x", "decoder": "z",
             "code_decoder": "indices", "generator": "noise", "recommender": "x"}[part]
    inputs = [first, "labels"] if _conditional(model) else [first]
    if part == "scorer":
        outputs = ["score", "is_anomaly"]
    elif part == "recommender":
        outputs = ["items", "scores"]
    elif part == "encoder" and model.family == "vq-vae":
        outputs = ["z", "indices"]
    elif part == "encoder" and n_outputs == 2:
        outputs = ["mu", "logvar"]
    elif part == "encoder":
        outputs = ["z"]
    else:
        outputs = ["reconstruction" if part != "generator" else "sample"]
    return inputs, outputs[:n_outputs] + [f"output{i}" for i in range(len(outputs), n_outputs)]


def _examples(model, part: str, batch: int, generator: torch.Generator) -> tuple:
    """Inputs for ``part`` at batch size ``batch``: (x[, labels])."""
    x = torch.rand(batch, *model.input_shape, generator=generator)
    if part == "recommender":  # interaction rows: some items seen (1), most not (0)
        x = (x < 0.2).float()
    labels = (torch.randint(0, model.num_classes, (batch,), generator=generator)
              if _conditional(model) else None)
    if part == "code_decoder":
        return (torch.randint(0, model.num_codes, (batch, model.num_latents),
                              generator=generator),)
    if part in ("decoder", "generator"):
        with torch.no_grad():
            code = _encode(model, x, labels) if labels is not None else _encode(model, x)
        code = code[0] if isinstance(code, tuple) else code
        x = (torch.randn(code.shape, generator=generator) if part == "generator"
             else code.contiguous())
    return (x,) if labels is None else (x, labels)


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _check_standard(proto: onnx.ModelProto) -> None:
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    custom = sorted({n.domain for n in nodes if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise VerificationError(f"the graph uses non-standard op domains {custom}")


def _metadata(model, part: str, threshold: float | None, inputs, outputs,
              k: int | None = None) -> dict[str, str]:
    import aecore

    # A recommender normalises its raw rows in the graph.
    norm = getattr(model, "normalization", None) if part != "recommender" else None
    meta = {
        "aecore_version": aecore.__version__,
        "family": model.family,
        "part": part,
        "input_shape": json.dumps(list(model.input_shape)),
        "latent_dim": json.dumps(int(model.latent_dim)),
        "normalization": json.dumps(None if norm is None else norm.to_dict()),
        "inputs": json.dumps(inputs),
        "outputs": json.dumps(outputs),
    }
    if _conditional(model):
        meta["num_classes"] = json.dumps(int(model.num_classes))
    if model.family == "vq-vae":
        meta["num_codes"] = json.dumps(int(model.num_codes))
        meta["num_latents"] = json.dumps(int(model.num_latents))
    if threshold is not None:
        meta["threshold"] = json.dumps(float(threshold))
    if k is not None:
        meta["k"] = json.dumps(int(k))
    return meta


def set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    """Merge ``props`` into the model's metadata_props (set_model_props would replace all)."""
    merged = {p.key: p.value for p in proto.metadata_props}
    merged.update(props)
    onnx.helper.set_model_props(proto, merged)


def compare(got: np.ndarray, want: np.ndarray, rtol: float, atol: float
            ) -> tuple[float, str | None]:
    """(max abs error over the finite entries, what is wrong or None) for same-shape float
    outputs; atol is relative to max(1, max |want|). Non-finite entries (a recommender's -inf
    for a user with fewer than k unseen items) must match exactly: they would make the error
    NaN and the tolerance infinite."""
    fin = np.isfinite(want)
    g, w = got[fin].astype(np.float64), want[fin].astype(np.float64)
    err = float(np.max(np.abs(g - w))) if g.size else 0.0
    if not np.array_equal(np.where(fin, 0, got), np.where(fin, 0, want), equal_nan=True):
        return err, "non-finite values where torch has others (or other ones)"
    scale = max(1.0, float(np.abs(w).max())) if w.size else 1.0
    if not np.allclose(g, w, rtol=rtol, atol=atol * scale):
        return err, f"max abs error {err:.3g}"
    return err, None


def verify(proto: onnx.ModelProto, wrapper: nn.Module, feeds: list[tuple], names: list[str],
           rtol: float = 1e-4, atol: float = 1e-5) -> dict[str, float]:
    """Compare ONNX Runtime and onnx.reference with torch on each feed; raise on mismatch.

    Returns the max abs error per output. Boolean outputs must agree except where the score
    sits within tolerance of the threshold.
    """
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ReferenceEvaluator(proto)
    worst: dict[str, float] = {}
    bad = []
    for feed in feeds:
        with torch.no_grad():
            want = [t.numpy() for t in _as_tuple(wrapper(*feed))]
        arrays = {n: t.numpy() for n, t in zip(names, feed)}
        for engine, got in (("onnxruntime", session.run(None, arrays)),
                            ("onnx.reference", reference.run(None, arrays))):
            for i, (g, w) in enumerate(zip(got, want)):
                key = f"{engine}:output{i}"
                if getattr(wrapper, "part", None) == "recommender" and i == 0:
                    # Items whose scores agree to rounding may swap ranks between engines: the
                    # items are right when torch scores them as it scores its own top k.
                    with torch.no_grad():
                        full = wrapper.item_scores(feed[0]).numpy()
                    g = g.astype(np.int64)  # -1: no item (score -inf)
                    picked = np.where(g >= 0, np.take_along_axis(full, np.maximum(g, 0), 1),
                                      -np.inf)
                    mismatch = float(np.sum(g != w))
                    worst[key] = max(worst.get(key, 0.0), mismatch)
                    if g.shape != w.shape or not np.allclose(picked, want[1], rtol=rtol,
                                                             atol=atol):
                        bad.append(f"{key} at batch {len(feed[0])}: items that torch does "
                                   "not rank in its top k")
                    continue
                if w.dtype == np.bool_:
                    mismatch = int(np.sum(g != w))
                    worst[key] = max(worst.get(key, 0.0), float(mismatch))
                    if mismatch:
                        score = want[0]
                        near = np.abs(score - wrapper.threshold) <= atol + rtol * np.abs(score)
                        if np.any((g != w) & ~near):
                            bad.append(f"{key} flags differ in {mismatch} samples")
                    continue
                if g.shape != w.shape:
                    bad.append(f"{key} shape {g.shape} != torch's {w.shape}")
                    continue
                err, problem = compare(g, w, rtol, atol)
                worst[key] = max(worst.get(key, 0.0), err)
                if problem:
                    bad.append(f"{key} at batch {len(feed[0])}: {problem}")
    if bad:
        raise VerificationError("ONNX outputs disagree with torch: " + "; ".join(bad)
                                + f" (max abs error per output: {worst})")
    return worst


def to_onnx(model, path: str | os.PathLike, *, part: str = "autoencoder", opset: int = 20,
            verify: bool = True, threshold: float | None = None, k: int = 10,
            check_batches: tuple[int, int] = (3, 5)) -> Path:
    """Export ``part`` of ``model`` to ``path`` (one file, dynamic batch, standard ops only).

    ``threshold``: the scorer's; ``k``: the recommender's number of items per user.

    With ``verify`` the graph runs in ONNX Runtime and onnx.reference at the two batch sizes of
    ``check_batches`` and must match torch, before anything is written. The write is atomic.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    top = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= top:
        # 18 is the exporter's oldest opset; older ones would need a lossy version conversion.
        raise ValueError(f"opset must be an int in [18, {top}], got {opset!r}")
    for attr in ("family", "input_shape", "latent_dim", "encode", "decode"):
        if not hasattr(model, attr):
            raise TypeError(f"model must be an aecore model (missing {attr!r}), "
                            f"got {type(model).__name__}")
    if getattr(model, "normalization", None) is not None:
        model.normalization.check_fits(model.input_shape, "model.normalization")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes - {torch.float32}:
        # The exported graph and every runtime (ORT, the C++ program) take float32 inputs.
        raise TypeError(f"to_onnx exports float32 models; this one has parameters of "
                        f"{sorted(map(str, dtypes))}: export a float32 copy "
                        "(copy.deepcopy(model).float())")
    if verify and (not isinstance(check_batches, (tuple, list)) or not check_batches
                   or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                          for b in check_batches)):
        # Verifying at no batch size would verify nothing; a batch of 0 checks no value.
        raise ValueError(f"check_batches must be a non-empty tuple of batch sizes >= 1, "
                         f"got {check_batches!r}")
    if part == "code_decoder" and model.family != "vq-vae":
        raise ValueError(f"part='code_decoder' decodes a VQ-VAE's code indices; "
                         f"{model.family!r} has no codebook: export its 'decoder' instead")
    if part == "generator" and not _has_prior(model):
        raise ValueError(f"part='generator' needs a model with a prior (vae, cvae); "
                         f"{model.family!r} has none: export its 'decoder' instead")
    if part == "recommender":
        if len(model.input_shape) != 1 or _conditional(model):
            raise ValueError(f"part='recommender' needs a model of flat interaction rows "
                             f"(users, items) without labels; {model.family!r} takes inputs of "
                             f"shape {tuple(model.input_shape)}")
        items = int(model.input_shape[0])
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= items:
            raise ValueError(f"k must be an int in [1, {items}] (the number of items), got {k!r}")
    else:
        k = None
    if part == "scorer" and threshold is None:
        threshold = getattr(model, "threshold", None)
        if threshold is None:
            raise ValueError("part='scorer' needs a threshold: pass threshold=... (aecore "
                             "export --threshold T) or set model.threshold (e.g. a high quantile "
                             "of training errors, a mean squared error on normalised inputs)")
    if threshold is not None:
        # A NaN threshold would export a scorer that never flags anything.
        # A negative one flags everything: no reconstruction error is below 0.
        if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                or not math.isfinite(threshold) or threshold < 0):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        threshold = float(threshold)
    # Export runs on the CPU in eval mode; the caller's model gets its mode and device back.
    training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        data = _export(model.eval().cpu(), part, opset, threshold, verify, check_batches, k)
    finally:
        model.train(training).to(device)
    return write_bytes(path, data)


def _export(model, part: str, opset: int, threshold: float | None, verify: bool,
            check_batches: tuple[int, int], k: int | None = None) -> bytes:
    """The serialized, checked (and with ``verify``, verified) ONNX model of ``part``."""
    wrapper = _Part(model, part, threshold, k).eval()
    gen = torch.Generator().manual_seed(0)
    example = _examples(model, part, 2, gen)  # batch >= 2: 0 and 1 get specialised
    with torch.no_grad():
        n_out = len(_as_tuple(wrapper(*example)))
    inputs, outputs = _io_names(model, part, n_out)
    batch = torch.export.Dim("batch")
    dynamic = {"x": {0: batch}, "y": {0: batch}} if len(example) == 2 else {"x": {0: batch}}
    # The exporter logs each missing optional op library (torchvision) at warning level.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, example, dynamo=True, opset_version=opset,
                                    dynamic_shapes=dynamic, input_names=inputs,
                                    output_names=outputs, verbose=False)
    proto = program.model_proto
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    _check_standard(proto)
    set_metadata(proto, _metadata(model, part, threshold if part == "scorer" else None,
                                  inputs, outputs, k))
    onnx.checker.check_model(proto)
    if verify:
        feeds = [_examples(model, part, b, gen) for b in check_batches]
        verify_fn = globals()["verify"]
        verify_fn(proto, wrapper, feeds, inputs)
    buf = io.BytesIO()
    onnx.save_model(proto, buf)
    return buf.getvalue()
