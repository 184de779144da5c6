"""Atomic file writes and model folders: safetensors weights + config.json + history.json.

Nothing here loads pickles: weights are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aecore.normalization import Normalization

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
HISTORY = "history.json"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    return atomic_write(path, write)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
               metadata: dict[str, str] | None = None) -> Path:
    """Write tensors to a safetensors file atomically (tied/shared storage is cloned apart)."""
    flat = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def save_model(model, directory: str | os.PathLike, history: list[dict] | None = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as a folder: model.safetensors, config.json and (if given) history.json.

    Each file is replaced atomically; config.json is written last, so a folder with a
    config always has complete weights beside it.
    """
    import aecore

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_state(directory / WEIGHTS, model.state_dict())
    if history is not None:
        write_json(directory / HISTORY, history)
    norm = model.normalization
    config = {
        "aecore_version": aecore.__version__,
        "family": model.family,
        "kwargs": model.config(),
        "normalization": None if norm is None else norm.to_dict(),
        **(extra or {}),
    }
    write_json(directory / CONFIG, config)
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {str(directory)!r}: not an aecore model folder")
    with open(path) as f:
        return json.load(f)


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild a model saved by :func:`save_model` (eval mode, on ``map_location``)."""
    from aecore.registry import model_class

    config = read_config(directory)
    model = model_class(config["family"])(**config["kwargs"])
    state = load_file(str(Path(directory) / WEIGHTS), device=str(map_location))
    model.load_state_dict(state)
    model.normalization = Normalization.from_dict(config.get("normalization"))
    return model.to(map_location).eval()


def load_history(directory: str | os.PathLike) -> list[dict]:
    path = Path(directory) / HISTORY
    if not path.is_file():
        return []
    with open(path) as f:
        return json.load(f)
