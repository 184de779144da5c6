"""What ``aecore export`` and ``aecore infer`` do."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from aecore.io import write_bytes


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_bytes(path, buf.getvalue())


def _calibration(model_dir, model, calibration: str | None) -> np.ndarray:
    """Calibration inputs for static int8: a .npy of raw data, or 512 training samples of the
    data set the model was trained on."""
    from aecore.io import read_config

    if calibration is not None:
        raw = np.load(calibration, allow_pickle=False)
    else:
        from aecore import data as datasets

        name = read_config(model_dir).get("data")
        if name is None:
            raise ValueError("static quantization needs --calibration FILE.npy (raw inputs)")
        raw = datasets.load(name).x_train[:512]
    x = model.normalization.apply(raw) if model.normalization is not None else raw
    return np.asarray(x, np.float32).reshape(len(x), *model.input_shape)


def export_cli(model_dir, part: str, out, quantize: str | None = None,
               threshold: float | None = None, calibration: str | None = None) -> dict | None:
    """Export a saved model folder's ``part`` to ``out``, optionally quantized."""
    from aecore.export.onnx_export import to_onnx
    from aecore.io import load_model

    model = load_model(model_dir)
    if quantize is None:
        to_onnx(model, out, part=part, threshold=threshold)
        print(f"wrote {out}")
        return None
    from aecore.export.quantize import quantize as quantize_fn

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        to_onnx(model, fp32, part=part, threshold=threshold)
        calib = _calibration(model_dir, model, calibration) if quantize == "static" else None
        report = quantize_fn(fp32, out, mode=quantize, calibration=calib)
    print(f"wrote {out} ({quantize}): {report['dst_bytes']} bytes, "
          f"{100 * report['size_ratio']:.0f}% of fp32; max abs error vs fp32 "
          f"{report['max_abs_error']:.3g}; latency {report['dst_latency_s'] * 1e6:.0f} us vs "
          f"{report['src_latency_s'] * 1e6:.0f} us")
    return report


def infer_cli(model_path, input_path, out_path, normalize: bool = True) -> dict:
    """Run an exported model on a .npy of raw inputs (the training data's units).

    The model's normalisation (from its metadata) is applied to the inputs and inverted on
    reconstructions. The first output goes to ``out_path``; further outputs beside it as
    ``<stem>.<name>.npy``.
    """
    from aecore.export.runtime import Model

    model = Model(model_path)
    x = np.load(input_path, allow_pickle=False)
    norm = model.metadata.get("normalization") if normalize else None
    part = model.metadata.get("part")
    if norm and part in ("autoencoder", "encoder", "scorer"):
        x = (x.astype(np.float32) - np.asarray(norm["mean"], np.float32)) \
            / np.asarray(norm["std"], np.float32)
    shape = model.metadata.get("input_shape")
    if shape and part in ("autoencoder", "encoder", "scorer") and x.ndim == len(shape):
        x = x[None]  # a single sample
    outputs = model.run_all(x)
    if norm and part in ("autoencoder", "decoder", "generator"):
        name = model.output_names[0]
        outputs[name] = (outputs[name] * np.asarray(norm["std"], np.float32)
                         + np.asarray(norm["mean"], np.float32))
    out_path = Path(out_path)
    for i, (name, value) in enumerate(outputs.items()):
        save_npy(out_path if i == 0 else out_path.with_suffix(f".{name}.npy"), value)
    print(f"wrote {out_path}: " + json.dumps({k: list(v.shape) for k, v in outputs.items()}))
    return outputs
