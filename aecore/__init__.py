"""aecore: autoencoders trained on fused Triton kernels, benchmarked honestly, shipped as ONNX.

Names resolve lazily, so that ``aecore.export.runtime`` (numpy + onnxruntime only) never pulls
torch in through this package's import.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "FusedLinear": "aecore.layers",
    "Encoder": "aecore.autoencoder",
    "ConvAutoEncoder": "aecore.conv",
    "SparseAutoEncoder": "aecore.sparse",
    "ContractiveAutoEncoder": "aecore.contractive",
    "GeometryAutoEncoder": "aecore.geometry",
    "VQVAE": "aecore.vqvae",
    "VAE": "aecore.vae",
    "ConditionalVAE": "aecore.vae",
    "Decoder": "aecore.autoencoder",
    "AutoEncoder": "aecore.autoencoder",
    "Trainer": "aecore.train",
    "TrainingDiverged": "aecore.train",
    "evaluate": "aecore.train",
    "save_model": "aecore.io",
    "load_model": "aecore.io",
    "Normalization": "aecore.normalization",
    "LatentIndex": "aecore.search",
}
_SUBMODULES = ("data", "losses", "kernels", "export", "plots", "io", "train", "families",
               "geometry", "search", "recommend")
# Modules that register model families when imported.
FAMILY_MODULES = (
    "aecore.autoencoder", "aecore.conv", "aecore.sparse", "aecore.contractive", "aecore.vqvae",
    "aecore.vae", "aecore.geometry",
)

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def register_all() -> None:
    """Import every module that defines a model family (filling aecore.registry.MODELS)."""
    for name in FAMILY_MODULES:
        importlib.import_module(name)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"aecore.{name}")
    else:
        raise AttributeError(f"module 'aecore' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
