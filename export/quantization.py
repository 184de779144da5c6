"""Edge variants of exported models: int8 (dynamic or static, with onnxruntime.quantization)
and fp16. Each comes with a report: sizes, output error against the fp32 model, latency, and
a scorer's flag agreement or a recommender's top-k overlap with it."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from aecore.io import check_output, write_bytes

MODES = ("dynamic", "static", "fp16")


class _Reader:
    """CalibrationDataReader over arrays: one feed per chunk of the calibration set."""

    def __init__(self, name: str, data: np.ndarray, chunk: int = 64):
        self._feeds = iter([{name: data[i:i + chunk]} for i in range(0, len(data), chunk)])

    def get_next(self):
        return next(self._feeds, None)


def _samples(a, name: str, dims: list[int], codes: int | None = None) -> np.ndarray:
    """``a`` as a contiguous float32 (N, *dims) array with N >= 1 and finite values; with
    ``codes`` (a code decoder's input), as int64 code indices in [0, codes)."""
    a = np.asarray(a)
    if a.dtype.kind not in ("biuf" if codes is None else "iu"):
        want = "a real numeric" if codes is None else "an integer (code indices)"
        raise TypeError(f"{name} must be {want} array, got dtype {a.dtype}")
    if a.ndim != len(dims) + 1 or list(a.shape[1:]) != dims or len(a) == 0:
        raise ValueError(f"{name} must have shape (N, {', '.join(map(str, dims))}) with N >= 1, "
                         f"got {a.shape}")
    if codes is not None:
        if a.min() < 0 or a.max() >= codes:
            raise ValueError(f"{name} must hold code indices in [0, {codes}), got values in "
                             f"[{a.min()}, {a.max()}]")
        return np.ascontiguousarray(a, dtype=np.int64)
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf (or values beyond float32's range)")
    return a


LAYER_OPS = ["MatMul", "Gemm", "Conv", "ConvTranspose"]  # the ops that hold weights


def topk_overlap(want_items: np.ndarray, want_scores: np.ndarray,
                 got_items: np.ndarray) -> float:
    """Mean share of each row's top-k items (N, k) that ``got_items`` (N, k) also lists,
    counting only the slots ``want_scores`` (N, k) scores finitely (-inf slots of users with
    fewer than k unseen items hold no recommendation). NaN when no slot is finite."""
    shares = [np.isin(w[np.isfinite(s)], g).mean()
              for w, s, g in zip(want_items, want_scores, got_items) if np.isfinite(s).any()]
    return float(np.mean(shares)) if shares else float("nan")


def _error(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| elementwise, 0 where both are the same infinity (a recommender's -inf
    scores for users without k unseen items must match exactly)."""
    same_inf = np.isinf(want) & (got == want)
    return np.where(same_inf, 0.0, np.abs(got.astype(np.float64) - want))


def _median_latency(session, feed: dict, reps: int = 20) -> float:
    session.run(None, feed)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quantize(src: str | os.PathLike, dst: str | os.PathLike, mode: str = "dynamic",
             calibration: np.ndarray | None = None, inputs: np.ndarray | None = None) -> dict:
    """Write an int8 (``dynamic``/``static``) or ``fp16`` variant of ``src`` to ``dst``.

    ``calibration`` (N, ...) float32 model inputs (int code indices for a ``code_decoder``) are
    required for ``static``; the report's
    error (of the first floating output: a recommender's scores) and latency are measured on
    ``inputs`` (default: the calibration set, else random inputs in [0, 1], 0/1 rows for a
    recommender). Returns {"mode", "src_bytes", "dst_bytes", "size_ratio",
    "max_abs_error", "mean_abs_error", "batch_effect" (how far a sample's output moves with
    the rest of its batch: dynamic int8's activation scales are the batch's; rounding alone
    in the other modes), "src_latency_s", "dst_latency_s"}, and for a
    recommender "topk_overlap" (:func:`topk_overlap` of the two files' lists), for a scorer
    "flag_agreement" (the share of inputs both flag alike).
    """
    import onnxruntime as ort

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX model at {str(src)!r}")
    dst = check_output(dst, None, (src,), name="dst")
    try:
        model = onnx.load(str(src))
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise ValueError(f"src {str(src)!r} is not an ONNX model ({type(e).__name__})") from None
    if len(model.graph.input) == 0:
        raise ValueError(f"src {str(src)!r} has no graph inputs: not an exported model")
    first = model.graph.input[0]
    if len(model.graph.input) != 1:
        raise ValueError("quantize takes single-input models (conditional models: export "
                         "and quantize with the labels folded in is not supported)")
    dims = [d.dim_value for d in first.type.tensor_type.shape.dim[1:]]
    if mode == "static" and calibration is None:
        raise ValueError("mode='static' needs calibration inputs (N, ...) float32")
    props = {p.key: p.value for p in model.metadata_props}
    # A code decoder takes int64 code indices; every other part float32 samples.
    codes = None
    if props.get("part") == "code_decoder":
        if not props.get("num_codes", "").isdigit():
            raise ValueError(f"src {str(src)!r} is a code decoder without a num_codes entry in "
                             "its metadata: export it again with aecore")
        codes = int(props["num_codes"])
    if calibration is not None:
        calibration = _samples(calibration, "calibration", dims, codes)
    if inputs is None:
        rng = np.random.default_rng(0)
        if calibration is not None:
            inputs = calibration[:256]
        elif codes is not None:
            inputs = rng.integers(0, codes, (64, *dims))
        else:
            inputs = rng.random((64, *dims), dtype=np.float32)
            if props.get("part") == "recommender":
                inputs = (inputs < 0.2).astype(np.float32)  # interaction rows: 1 = seen
    inputs = _samples(inputs, "inputs", dims, codes)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.onnx"
        if mode == "dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
        elif mode == "static":
            from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

            # A recommender ranks its scores: quantizing its softmax and seen-item mask ahead
            # of TopK turns close scores into ties (a MovieLens VAE's top-10 lists kept 72% of
            # fp32's items against 96% with its layers alone quantized).
            # The layers' outputs stay float too: each layer quantizes its input anyway, and
            # the last one's output is the softmax's input.
            layers = ({"op_types_to_quantize": LAYER_OPS,
                       "extra_options": {"OpTypesToExcludeOutputQuantization": LAYER_OPS}}
                      if props.get("part") == "recommender" else {})
            quantize_static(str(src), str(out), _Reader(first.name, calibration),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, **layers)
        else:
            from onnxruntime.transformers.float16 import (
                DEFAULT_OP_BLOCK_LIST,
                convert_float_to_float16,
            )

            # A scorer's flag compares in fp32, against the threshold its metadata states: in
            # fp16 the threshold would round, and flags would disagree with the fp32 file's.
            blocked = [*DEFAULT_OP_BLOCK_LIST, "LessOrEqual"]
            onnx.save(convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked),
                      str(out))
        result = onnx.load(str(out))
    props["quantization"] = mode
    onnx.helper.set_model_props(result, props)
    data = result.SerializeToString()

    cpu = ["CPUExecutionProvider"]
    ref = ort.InferenceSession(str(src), providers=cpu)
    new = ort.InferenceSession(data, providers=cpu)
    feed = {first.name: inputs}
    # The error is measured on the first floating output (a recommender's scores, not its
    # item indices); -inf scores (users without k unseen items) must match exactly.
    out = next(i for i, o in enumerate(ref.get_outputs()) if "float" in o.type)
    want_all, got_all = ref.run(None, feed), new.run(None, feed)
    want, got = want_all[out].astype(np.float64), got_all[out]
    err = _error(got, want)
    # Dynamic int8 scales each run's activations by the whole batch's range, so a sample's
    # output depends on the samples run beside it (an outlier, what a scorer looks for, moves
    # every other score): the largest change against running each sample alone.
    n = min(len(inputs), 64)
    alone = np.concatenate([new.run(None, {first.name: inputs[i:i + 1]})[out] for i in range(n)])
    report = {
        "mode": mode,
        "src_bytes": src.stat().st_size,
        "dst_bytes": len(data),
        "size_ratio": len(data) / src.stat().st_size,
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "batch_effect": float(_error(alone, got[:n].astype(np.float64)).max()),
        "src_latency_s": _median_latency(ref, feed),
        "dst_latency_s": _median_latency(new, feed),
    }
    # What the part's user acts on: a recommender's top-k lists, a scorer's flags.
    if props.get("part") == "recommender":
        report["topk_overlap"] = topk_overlap(want_all[0], want_all[1], got_all[0])
    elif props.get("part") == "scorer":
        report["flag_agreement"] = float(np.mean(want_all[1] == got_all[1]))
    write_bytes(dst, data)
    return report
