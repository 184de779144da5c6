"""aecore.export: ONNX export with verification, int8/fp16 variants, and a torch-free runtime.

``aecore.export.runtime`` needs only numpy and onnxruntime; the exporter (which needs torch) is
imported on first use, so importing the runtime never pulls torch in.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "to_onnx": "aecore.export.onnx_export",
    "VerificationError": "aecore.export.onnx_export",
    "PARTS": "aecore.export.onnx_export",
    "quantize": "aecore.export.quantization",
    "Model": "aecore.export.runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aecore.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
