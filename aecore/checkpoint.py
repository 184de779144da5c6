"""Training checkpoints that survive crashes: each is a complete folder, and ``latest.json``
(replaced atomically, last) names the newest one. A checkpoint is written under a temporary
name and renamed into place, never over the folder the pointer names, so a crash mid-save
leaves the pointer on the previous complete checkpoint. Tensors go to safetensors, everything
else to JSON. Each checkpoint records its model's family and config, checked on load."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from aecore.io import _umask, save_state, write_json

LATEST = "latest.json"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"state": {}, "param_groups": state["param_groups"]}
    for pid, pstate in state["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
                meta["state"][str(pid)][k] = {"tensor": f"{pid}.{k}"}
            else:
                meta["state"][str(pid)][k] = {"value": v}
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, pstate in meta["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"]
                           for k, v in pstate.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """{"family", "config"} of ``model`` in JSON form (config None for a model without one)."""
    try:
        config = model.config() if callable(getattr(model, "config", None)) else None
    except NotImplementedError:  # a model class that declares config() without giving one
        config = None
    family = getattr(model, "family", "") or type(model).__name__
    # Through JSON so that it compares equal to what a checkpoint read back holds (tuples...).
    return json.loads(json.dumps({"family": family, "config": config}))


def _check_identity(folder: Path, saved: dict[str, Any], model: torch.nn.Module) -> None:
    now = model_identity(model)
    if saved["family"] != now["family"]:
        raise ValueError(f"{folder} is a checkpoint of a {saved['family']!r} model; it cannot "
                         f"resume a {now['family']!r} one")
    old, new = saved["config"] or {}, now["config"] or {}
    diff = [f"{k} (checkpoint {old.get(k)!r}, model {new.get(k)!r})"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"{folder} is a checkpoint of a {saved['family']!r} model with another "
                         f"config; it differs in {', '.join(diff)}")


def holds_checkpoints(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a training run's checkpoints (a pointer or a folder)."""
    root = Path(directory)
    return (root / LATEST).is_file() or any(p.is_dir() for p in root.glob("epoch-*"))


def _pointed(root: Path) -> str | None:
    """The folder name latest.json holds, or None (no pointer, or an unreadable one)."""
    try:
        with open(root / LATEST) as f:
            return json.load(f)["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_checkpoint(directory: str | os.PathLike, epoch: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], keep: int = 2,
                    best: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``epoch`` under ``directory`` and point latest.json at it. ``best``:
    the best weights so far (early stopping restores them, across a resume too)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:05d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        # mkdtemp's folder is private (0700); a checkpoint is as readable as the run's files.
        os.chmod(tmp, 0o777 & ~_umask())
        save_state(tmp / "model.safetensors", model.state_dict())
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_state(tmp / "optimizer.safetensors", opt_tensors)
        save_state(tmp / "rng.safetensors", rng)
        if best is not None:
            save_state(tmp / "best.safetensors", best)
        write_json(tmp / "trainer.json", {"epoch": epoch, "optimizer": opt_meta,
                                          "model": model_identity(model), **trainer_state})
        # The folder the pointer names stays untouched until the pointer has moved (a fresh
        # run in the same directory reaches the same epoch names): take a free name instead.
        pointed, n = _pointed(root), 0
        while name == pointed:
            n += 1
            name = f"epoch-{epoch:05d}-{n}"
        folder = root / name
        if folder.exists():  # an older checkpoint nothing points at
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json(root / LATEST, {"checkpoint": folder.name})
    # Older checkpoints (and folders of saves a crash interrupted) go only after the pointer
    # has moved on.
    done = sorted(p for p in root.glob("epoch-*") if p.is_dir() and p.name != folder.name)
    for old in [*done[: max(0, len(done) - (keep - 1))], *root.glob(".epoch-*.tmp")]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The folder latest.json points at, or None when there is no checkpoint. ValueError
    naming the pointer when it is unreadable, FileNotFoundError when its folder is gone."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    try:
        with open(pointer) as f:
            name = json.load(f)["checkpoint"]
        if not isinstance(name, str) or Path(name).name != name or not name:
            raise TypeError(f"'checkpoint' must be a folder name, got {name!r}")
    except (ValueError, KeyError, TypeError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise ValueError(f"{pointer} is damaged ({_why(e)}); start afresh in another folder "
                         f"or remove {Path(directory)}") from None
    folder = Path(directory) / name
    if not (folder / "trainer.json").is_file():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is incomplete or missing")
    return folder


# What a trainer reads back from a checkpoint besides the model and the optimizer.
_STATE_KEYS = ("epoch", "history", "best", "bad_epochs")
_RNG_KEYS = ("shuffle", "noise", "torch")


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)


def _read(path: Path, **kwargs) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; ValueError naming the file when it is damaged."""
    try:
        return load_file(str(path), **kwargs)
    except SafetensorError as e:
        raise ValueError(f"{path.name}: {e}") from None


def load_checkpoint(folder: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer,
                    check_state: Callable[[dict], None] | None = None
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model and optimizer in place; return (trainer state, rng states).
    ``check_state(trainer state)`` may raise to refuse the checkpoint before anything is
    restored.

    Every file is read before anything is restored. ValueError naming the checkpoint when a
    file of it is missing or damaged or does not fit model / optimizer, or when its model has
    another family or config than ``model`` (checkpoints that predate this record are not
    checked)."""
    folder = Path(folder)

    def damaged(e: BaseException) -> ValueError:
        return ValueError(f"checkpoint {folder} is damaged ({_why(e)}); resume from an intact "
                          "run or start afresh")

    try:
        with open(folder / "trainer.json") as f:
            try:
                state = json.load(f)
            except ValueError as e:
                raise ValueError(f"trainer.json: {e}") from None
        if not isinstance(state, dict):
            raise TypeError(f"trainer.json must hold a JSON object, got {type(state).__name__}")
        saved = state.pop("model", None)
        missing = [k for k in (*_STATE_KEYS, "optimizer") if k not in state]
        if missing:
            raise KeyError(f"trainer.json lacks {missing}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise damaged(e) from None
    if saved is not None:
        _check_identity(folder, saved, model)
    if check_state is not None:
        check_state(state)
    device = next(model.parameters()).device
    try:
        weights = _read(folder / "model.safetensors")
        opt_tensors = _read(folder / "optimizer.safetensors", device=str(device))
        opt_state = _unflatten_optimizer(opt_tensors, state.pop("optimizer"))
        rng = _read(folder / "rng.safetensors")
        missing = [k for k in _RNG_KEYS if k not in rng]
        if missing:
            raise KeyError(f"rng.safetensors lacks {missing}")
        _check_rng(rng)
        model.load_state_dict(weights)
        optimizer.load_state_dict(opt_state)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise damaged(e) from None
    return state, rng


def _check_rng(rng: dict[str, torch.Tensor]) -> None:
    """ValueError unless ``rng`` holds generator states: uint8 vectors, the CPU generators'
    (shuffle, torch) of a CPU generator's size (checked before anything is restored, where
    set_state would fail with the model already loaded)."""
    size = torch.get_rng_state().numel()
    for key, t in rng.items():
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"rng.safetensors: {key} is not a generator state (a uint8 "
                             f"vector), got {t.dtype} of shape {tuple(t.shape)}")
        if key in ("shuffle", "torch") and t.numel() != size:
            raise ValueError(f"rng.safetensors: {key} holds {t.numel()} bytes, a CPU "
                             f"generator's state {size}")


def load_best(folder: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The best weights a checkpoint kept for early stopping, or None if it kept none."""
    path = Path(folder) / "best.safetensors"
    if not path.is_file():
        return None
    try:
        return _read(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {Path(folder)} is damaged ({e}); resume from an intact "
                         "run or start afresh") from None
