"""Training checkpoints that survive crashes: each is a complete folder, and ``latest.json``
(replaced atomically, last) names the newest one. A crash mid-save leaves the pointer on the
previous complete checkpoint. Tensors go to safetensors, everything else to JSON."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from aecore.io import save_state, write_json

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


def save_checkpoint(directory: str | os.PathLike, epoch: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], keep: int = 2,
                    best: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``epoch`` under ``directory`` and point latest.json at it. ``best``:
    the best weights so far (early stopping restores them, across a resume too)."""
    root = Path(directory)
    folder = root / f"epoch-{epoch:05d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_state(folder / "model.safetensors", model.state_dict())
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_state(folder / "optimizer.safetensors", opt_tensors)
    save_state(folder / "rng.safetensors", rng)
    if best is not None:
        save_state(folder / "best.safetensors", best)
    write_json(folder / "trainer.json", {"epoch": epoch, "optimizer": opt_meta, **trainer_state})
    write_json(root / LATEST, {"checkpoint": folder.name})
    # Older checkpoints go only after the pointer has moved on.
    done = sorted(p for p in root.glob("epoch-*") if p.is_dir() and p.name != folder.name)
    for old in done[: max(0, len(done) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The folder latest.json points at, or None when there is no checkpoint."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    with open(pointer) as f:
        folder = Path(directory) / json.load(f)["checkpoint"]
    if not (folder / "trainer.json").is_file():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is incomplete or missing")
    return folder


def load_checkpoint(folder: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model and optimizer in place; return (trainer state, rng states)."""
    folder = Path(folder)
    with open(folder / "trainer.json") as f:
        state = json.load(f)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    device = next(model.parameters()).device
    opt_tensors = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state.pop("optimizer")))
    rng = load_file(str(folder / "rng.safetensors"))
    return state, rng


def load_best(folder: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The best weights a checkpoint kept for early stopping, or None if it kept none."""
    path = Path(folder) / "best.safetensors"
    return load_file(str(path)) if path.is_file() else None
