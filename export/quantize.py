"""Edge variants of exported models: int8 (dynamic or static, with onnxruntime.quantization)
and fp16. Each comes with a report: sizes, output error against the fp32 model, latency."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from aecore.io import write_bytes

MODES = ("dynamic", "static", "fp16")


class _Reader:
    """CalibrationDataReader over arrays: one feed per chunk of the calibration set."""

    def __init__(self, name: str, data: np.ndarray, chunk: int = 64):
        self._feeds = iter([{name: data[i:i + chunk]} for i in range(0, len(data), chunk)])

    def get_next(self):
        return next(self._feeds, None)


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

    ``calibration`` (N, ...) float32 model inputs are required for ``static``; the report's
    error and latency are measured on ``inputs`` (default: the calibration set, else random
    inputs in [0, 1]). Returns {"mode", "src_bytes", "dst_bytes", "size_ratio",
    "max_abs_error", "mean_abs_error", "src_latency_s", "dst_latency_s"}.
    """
    import onnxruntime as ort

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX model at {str(src)!r}")
    model = onnx.load(str(src))
    first = model.graph.input[0]
    if len(model.graph.input) != 1:
        raise ValueError("quantize takes single-input models (conditional models: export "
                         "and quantize with the labels folded in is not supported)")
    dims = [d.dim_value for d in first.type.tensor_type.shape.dim[1:]]
    if mode == "static":
        if calibration is None:
            raise ValueError("mode='static' needs calibration inputs (N, ...) float32")
        calibration = np.ascontiguousarray(calibration, dtype=np.float32)
        if list(calibration.shape[1:]) != dims:
            raise ValueError(f"calibration must have shape (N, {', '.join(map(str, dims))}), "
                             f"got {calibration.shape}")
    if inputs is None:
        inputs = (calibration[:256] if calibration is not None
                  else np.random.default_rng(0).random((64, *dims), dtype=np.float32))
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.onnx"
        if mode == "dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
        elif mode == "static":
            from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

            quantize_static(str(src), str(out), _Reader(first.name, calibration),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        else:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(model, keep_io_types=True), str(out))
        result = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    props["quantization"] = mode
    onnx.helper.set_model_props(result, props)
    data = result.SerializeToString()

    cpu = ["CPUExecutionProvider"]
    ref = ort.InferenceSession(str(src), providers=cpu)
    new = ort.InferenceSession(data, providers=cpu)
    feed = {first.name: inputs}
    want, got = ref.run(None, feed)[0], new.run(None, feed)[0]
    err = np.abs(got.astype(np.float64) - want)
    report = {
        "mode": mode,
        "src_bytes": src.stat().st_size,
        "dst_bytes": len(data),
        "size_ratio": len(data) / src.stat().st_size,
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "src_latency_s": _median_latency(ref, feed),
        "dst_latency_s": _median_latency(new, feed),
    }
    write_bytes(dst, data)
    return report
