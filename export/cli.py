"""What ``aecore export`` and ``aecore infer`` do."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np

from aecore.io import atomic_writes, check_output, load_npy


def save_npys(arrays: dict[Path, np.ndarray]) -> None:
    """Write each array to its .npy path, as one set (:func:`aecore.io.atomic_writes`): a
    failed write leaves the earlier run's files as they were."""
    def writer(array: np.ndarray):
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
        return write

    atomic_writes({path: writer(a) for path, a in arrays.items()})


def _part_inputs(model_dir, model, part: str, path: str | None = None, split: str = "train",
                 n: int = 512) -> np.ndarray | None:
    """Inputs of ``part`` as its ONNX file takes them. From ``path`` (--calibration): raw data
    (the training data's units) for parts that take x, codes or noise as given for the decoder
    and generator, code indices as given for the code decoder. Without it: the first ``n``
    samples of the ``split`` of the model's data set, encoded for the decoder (their code
    indices for the code decoder); standard normal noise for the generator; None when the
    model's config names no data set."""
    import torch

    from aecore.io import sample_rows, training_record

    if part == "generator" and path is None:
        return np.random.default_rng(0).standard_normal((n, model.latent_dim),
                                                        dtype=np.float32)
    if path is not None:
        source = "--calibration"
        raw = load_npy(path, source)
        if part in ("decoder", "generator"):
            return np.asarray(raw, np.float32)
        if part == "code_decoder":
            return raw  # quantize checks the indices' dtype, shape and range
    else:
        from aecore import data as datasets

        config = training_record(model_dir)
        if config["data"] is None:
            return None
        source = f"the model's data set {config['data']!r} (config.json)"
        # The training run's seed: it drew the split, so "test" stays held out.
        ds = datasets.load(config["data"], root=config["data_root"], seed=config["seed"],
                           label_column=config["label_column"])
        raw = (ds.x_train if split == "train" else ds.x_test)[:n]
    # The recommender normalises in-graph: it takes raw rows.
    x = sample_rows(raw, model.input_shape, source,
                    model.normalization if part != "recommender" else None)
    if part == "code_decoder":
        return model.codes(torch.from_numpy(x)).numpy()
    if part != "decoder":
        return x
    from aecore.export.onnx_export import _encode

    with torch.no_grad():
        code = _encode(model, torch.from_numpy(x))  # the encoder part's code
    return (code[0] if isinstance(code, tuple) else code).numpy()


DEFAULT_K = 10  # the recommender's items per user


def export_cli(model_dir, part: str, out, quantize: str | None = None,
               threshold: float | None = None, calibration: str | None = None,
               k: int | None = None) -> dict | None:
    """Export a saved model folder's ``part`` to ``out``, optionally quantized. ``k`` (the
    recommender's items per user) defaults to ``DEFAULT_K``."""
    from aecore.export.onnx_export import _conditional, to_onnx
    from aecore.io import load_model

    # Options this export has no use for would be ignored without a word.
    if calibration is not None and quantize != "static":
        raise ValueError("--calibration is for --quantize static")
    if threshold is not None and part != "scorer":
        raise ValueError(f"--threshold is for --part scorer, not {part!r}")
    if k is not None and part != "recommender":
        raise ValueError(f"--k is for --part recommender, not {part!r}")
    k = DEFAULT_K if k is None else k
    out = check_output(out, ".onnx")
    model = load_model(model_dir)
    if part == "recommender":
        from aecore.recommend import check_trained_on_interactions

        check_trained_on_interactions(model_dir)
        items = math.prod(model.input_shape)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= items:
            raise ValueError(f"--k must be an int in [1, {items}] (the number of items), "
                             f"got {k!r}")
    if quantize is not None and _conditional(model):
        # Checked before the export and the calibration set (which would need labels).
        raise ValueError(f"--quantize takes single-input models; {str(model_dir)!r} is "
                         "conditional (x and labels), and quantizing with the labels folded "
                         "in is not supported: export it without --quantize")
    if quantize is None:
        to_onnx(model, out, part=part, threshold=threshold, k=k)
        print(f"wrote {out}")
        return None
    from aecore.export.quantization import quantize as quantize_fn

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        to_onnx(model, fp32, part=part, threshold=threshold, k=k)
        calib = None
        if quantize == "static":
            try:
                calib = _part_inputs(model_dir, model, part, calibration)
            except FileNotFoundError as e:
                if calibration is not None:
                    raise
                raise FileNotFoundError(f"static quantization calibrates on the model's data "
                                        f"set, which is missing ({e}); pass --calibration "
                                        "FILE.npy (raw inputs)") from None
            if calib is None:
                raise ValueError("static quantization needs --calibration FILE.npy (raw "
                                 "inputs): the model's config names no data set")
        # The report compares the two files on held-out data where the model has any.
        try:
            held_out = _part_inputs(model_dir, model, part, split="test", n=256)
        except FileNotFoundError as e:
            print(f"note: the report runs random inputs; the model's data set is missing ({e})")
            held_out = None
        else:
            if held_out is None and calib is None:
                print("note: the report runs random inputs; the model's config names no data "
                      "set (save_model(..., extra={'data': ...}) records one)")
        report = quantize_fn(fp32, out, mode=quantize, calibration=calib, inputs=held_out)
    print(f"wrote {out} ({quantize}): {report['dst_bytes']} bytes, "
          f"{100 * report['size_ratio']:.0f}% of fp32; max abs error vs fp32 "
          f"{report['max_abs_error']:.3g}; latency {report['dst_latency_s'] * 1e6:.0f} us vs "
          f"{report['src_latency_s'] * 1e6:.0f} us")
    if "topk_overlap" in report:
        print(f"  top-k lists share {100 * report['topk_overlap']:.1f}% of their items with "
              "fp32's")
    if "flag_agreement" in report:
        print(f"  flags agree with fp32's on {100 * report['flag_agreement']:.1f}% of inputs")
    if quantize == "dynamic":
        print(f"  a sample's output moves by up to {report['batch_effect']:.3g} with the rest of "
              "its batch (dynamic int8 scales activations per batch; static fixes them)")
    return report


def _infer_inputs(model, raw: np.ndarray, input_path, normalize: bool) -> np.ndarray:
    """The first input of the exported ``model`` from raw samples, in the layouts ``aecore
    denoise`` takes: (N, *sample) flat or shaped, or one sample; codes (N, latent) or one code
    for a decoder or generator; integer code indices (N, num_latents) or one row of them for a
    code decoder. Normalised as the model's metadata says."""
    from aecore.io import sample_rows
    from aecore.normalization import Normalization

    part = model.metadata.get("part")
    name = f"input {str(input_path)!r}"
    if part == "code_decoder":
        if raw.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer code indices, got dtype {raw.dtype}")
        return np.atleast_2d(raw)  # the runtime checks their shape and range
    if part in ("decoder", "generator"):
        dims = model.inputs[0].shape[1:]
        if not all(isinstance(d, int) for d in dims):  # a graph without fixed code dims
            return raw
        return sample_rows(raw, dims, name)
    shape = model.metadata.get("input_shape")
    if not shape or part not in ("autoencoder", "encoder", "scorer", "recommender"):
        return raw
    if part == "recommender":
        # As aecore recommend takes them: 0/1 (or count) rows of any real dtype, bool too; the
        # graph normalises them itself.
        rows = sample_rows(raw, shape, name)
        if (rows < 0).any():
            raise ValueError(f"{name} must hold finite, non-negative interaction values")
        return rows
    norm = model.metadata.get("normalization") if normalize else None
    return sample_rows(raw, shape, name, Normalization.from_dict(norm) if norm else None)


def infer_cli(model_path, input_path, out_path, labels_path=None, normalize: bool = True) -> dict:
    """Run an exported model on a .npy of raw inputs (the training data's units).

    The model's normalisation (from its metadata) is applied to the inputs and inverted on
    reconstructions. A conditional model also takes ``labels_path``, a .npy of int class ids
    (one per sample). The first output goes to ``out_path`` (an autoencoder's reconstructions
    in the input's layout); further outputs beside it as ``<stem>.<name>.npy``.
    """
    from aecore.export.runtime import Model
    from aecore.normalization import Normalization

    model = Model(model_path)
    conditional = "labels" in model.input_names
    if conditional and labels_path is None:
        raise ValueError("the model is conditional: pass --labels FILE.npy (int class ids, "
                         "one per sample)")
    if labels_path is not None and not conditional:
        raise ValueError("--labels is for conditional models; this one takes no labels")
    out_path = check_output(out_path, ".npy")
    paths = [out_path.with_suffix(f".{name}.npy") for name in model.output_names[1:]]
    for p in (out_path, *paths):
        check_output(p, ".npy", (model_path, input_path, labels_path))
    raw = load_npy(input_path, "input")
    x = _infer_inputs(model, raw, input_path, normalize)
    extra = ()
    if conditional:
        labels = load_npy(labels_path, "--labels")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"--labels must hold integer class ids, got dtype {labels.dtype}")
        extra = (np.atleast_1d(labels).astype(np.int64),)
    norm = model.metadata.get("normalization") if normalize else None
    outputs = model.run_all(x, *extra)
    first = model.output_names[0]
    if norm and model.metadata.get("part") in ("autoencoder", "decoder", "code_decoder",
                                               "generator"):
        outputs[first] = Normalization.from_dict(norm).invert(outputs[first])
    if model.metadata.get("part") == "autoencoder" and outputs[first].size == raw.size:
        # Reconstructions in the input's layout, as aecore denoise writes them.
        outputs[first] = outputs[first].reshape(raw.shape)
    save_npys(dict(zip((out_path, *paths), outputs.values())))
    print(f"wrote {out_path}: " + json.dumps({k: list(v.shape) for k, v in outputs.items()}))
    return outputs
