"""Run exported aecore models in ONNX Runtime with numpy alone: nothing here imports torch.

>>> m = Model("model.onnx")
>>> recon = m.run(x)                 # first output, numpy
>>> outs = m.run_all(x)              # {"score": ..., "is_anomaly": ...} for a scorer
>>> m.metadata["normalization"]      # what the model expects its inputs to be scaled by
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import onnxruntime as ort

_NP_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64,
             "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _parse(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


def default_providers() -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU, then the CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class Model:
    """An exported model in an ONNX Runtime session.

    ``run(x, *extra)`` returns the first output; ``run_all`` a dict of every output. Inputs of any
    batch size are accepted; batches above ``max_batch`` run in chunks. Calls are safe from
    several threads at once (the session is, and this class keeps no per-call state).
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None,
                 threads: int | None = None, max_batch: int = 8192):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no ONNX model at {str(path)!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        if providers is not None:
            # ONNX Runtime takes names, or (name, options dict) pairs.
            def name(p):
                if isinstance(p, str):
                    return p
                if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) \
                        and isinstance(p[1], dict):
                    return p[0]
                raise TypeError(f"providers must be a list of provider names or (name, options) "
                                f"pairs, got {providers!r}")

            if isinstance(providers, str) or not isinstance(providers, (list, tuple)):
                raise TypeError(f"providers must be a list of provider names, got {providers!r}")
            available = ort.get_available_providers()
            names = [name(p) for p in providers]
            if not names or any(n not in available for n in names):
                raise ValueError(f"providers must name available providers {available}, "
                                 f"got {names!r}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options,
                                                providers=providers or default_providers())
        except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, ...: not a usable model
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{str(path)!r} is not a model ONNX Runtime can load: "
                             f"{first}") from None
        self.max_batch = max_batch
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, Any] = {k: _parse(v) for k, v in meta.items()}
        # Integer inputs hold ids the graph can't check: a conditional model's class ids, a
        # code decoder's code indices. Their range, from the metadata, is checked per call.
        ranges = {"labels": ("class ids", self.metadata.get("num_classes")),
                  "indices": ("code indices", self.metadata.get("num_codes"))}
        self.inputs = self.session.get_inputs()
        self.input_names = [i.name for i in self.inputs]
        self._specs = []
        for spec in self.inputs:
            want = _NP_TYPES.get(spec.type)
            if want is None:
                raise TypeError(f"input {spec.name!r} has unsupported type {spec.type}")
            fixed = tuple((axis, dim) for axis, dim in enumerate(spec.shape)
                          if isinstance(dim, int))
            want = np.dtype(want)
            what, bound = ranges.get(spec.name, (None, None))
            bound = (what, bound) if isinstance(bound, int) and bound > 0 else None
            self._specs.append((spec.name, want, want.kind == "f", spec.shape, fixed, bound))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _check(self, arrays: tuple) -> list[np.ndarray]:
        if len(arrays) != len(self._specs):
            names = ", ".join(i.name for i in self.inputs)
            raise ValueError(f"the model takes {len(self.inputs)} input(s) ({names}), "
                             f"got {len(arrays)}")
        out = []
        # Per-input facts are precomputed in __init__: this runs on every call, and at batch 1
        # its cost is a visible part of the latency.
        for a, (name, want, is_float, shape, fixed, bound) in zip(arrays, self._specs):
            if not isinstance(a, np.ndarray):
                a = np.asarray(a)
            if a.dtype.kind not in ("f" if is_float else "iu"):
                raise TypeError(f"input {name!r} must be a {want.name} array, "
                                f"got dtype {a.dtype}")
            if a.ndim != len(shape):
                raise ValueError(f"input {name!r} must have rank {len(shape)} "
                                 f"(shape {_show(shape)}), got shape {a.shape}")
            for axis, exp in fixed:
                if a.shape[axis] != exp:
                    raise ValueError(f"input {name!r} must have shape {_show(shape)}, "
                                     f"got {a.shape} (axis {axis})")
            if a.shape[0] == 0:
                raise ValueError(f"input {name!r} is an empty batch")
            if out and a.shape[0] != out[0].shape[0]:
                raise ValueError(f"input {name!r} has batch {a.shape[0]}, but "
                                 f"{self.inputs[0].name!r} has {out[0].shape[0]}")
            # An out-of-range class id one-hot encodes to zeros in the graph, a silent wrong
            # answer; an out-of-range code index decodes to NaN. Both are caught here, before
            # the cast to int64 (a uint64 beyond its range would wrap).
            if bound and (a.min() < 0 or a.max() >= bound[1]):
                raise ValueError(f"input {name!r} must hold {bound[0]} in [0, {bound[1]}), "
                                 f"got values in [{a.min()}, {a.max()}]")
            if a.dtype != want or not a.flags.c_contiguous:
                a = np.ascontiguousarray(a, dtype=want)
            # One reduction finds NaN/Inf (a sum of finite values is finite unless it
            # overflows; only then is every element checked).
            if is_float and not math.isfinite(a.sum()) and not np.isfinite(a).all():
                raise ValueError(f"input {name!r} contains NaN or Inf")
            out.append(a)
        return out

    def _run(self, names: list[str], arrays: list[np.ndarray]) -> list[np.ndarray]:
        """session.run over batches of at most max_batch rows, outputs concatenated."""
        n = arrays[0].shape[0]
        if n <= self.max_batch:  # the common case, kept lean: batch-1 latency is tens of us
            return self.session.run(names, dict(zip(self.input_names, arrays)))
        chunks = []
        for i in range(0, n, self.max_batch):
            feed = {name: a[i:i + self.max_batch] for name, a in zip(self.input_names, arrays)}
            chunks.append(self.session.run(names, feed))
        return [np.concatenate([c[j] for c in chunks]) for j in range(len(names))]

    def run_all(self, x, *extra) -> dict[str, np.ndarray]:
        """Every output for inputs (x, *extra) (B, ...) as {name: array (B, ...)}."""
        return dict(zip(self.output_names, self._run(self.output_names, self._check((x, *extra)))))

    def run(self, x, *extra) -> np.ndarray:
        """The first output for inputs (x, *extra); the others are not computed."""
        return self._run(self.output_names[:1], self._check((x, *extra)))[0]


def _show(shape) -> str:
    return "(" + ", ".join(str(s) if isinstance(s, int) else "batch" for s in shape) + ")"
