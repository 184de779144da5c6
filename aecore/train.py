"""Training: a Trainer that any aecore model plugs into through ``model.loss``.

Resumable (a resumed run repeats an uninterrupted one exactly on CPU), crash-safe checkpoints,
a NaN/Inf guard, early stopping on validation loss, bf16 autocast on CUDA, and data-parallel
training across processes started by ``torchrun`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import atexit
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from aecore.checkpoint import (
    holds_checkpoints,
    latest_checkpoint,
    load_best,
    load_checkpoint,
    save_checkpoint,
)
from aecore.checks import native_order, number, positive_int
from aecore.io import check_output_dir

Corruption = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint (if any) is kept."""


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype inputs are cast to: the model's floating parameters' (float32 if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _as_tensor(a, name: str, dtype=None) -> torch.Tensor | None:
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(native_order(a)))
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch.Tensor, got {type(a).__name__}")
    return a.to(dtype) if dtype is not None else a


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed() -> tuple[int, int]:
    """(rank, world_size); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            # One GPU per rank: "cuda" (the Trainer's default device) then means this rank's.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # Torch asks for a group to be destroyed before exit rather than left to interpreter
        # teardown, where its threads are torn down in no set order.
        atexit.register(_leave_group)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_same_run(folder: Path, saved: dict | None, run: dict) -> None:
    """ValueError naming what differs when a checkpoint's run split other data, or split it
    otherwise, than this one (checkpoints that predate this record are not checked)."""
    if saved is None:
        return
    differ = [k for k, v in run.items() if saved.get(k) != v and not (
        k == "data_sum" and isinstance(saved.get(k), float)
        and math.isclose(saved[k], v, rel_tol=1e-9, abs_tol=1e-9))]
    if "samples" in differ or "sample_shape" in differ:
        differ = [k for k in differ if k != "data_sum"]  # other data, said more precisely
    if differ:
        what = "; ".join("other data" if k == "data_sum" else
                         f"{k} {saved.get(k)!r} (now {run[k]!r})" for k in differ)
        raise ValueError(f"checkpoint {folder} comes from a run with {what}: the "
                         "train/validation split would differ. Resume with the same data, seed "
                         "and val_fraction, or start afresh in another checkpoint folder")


@torch.no_grad()
def evaluate(model: torch.nn.Module, x, y=None, batch_size: int = 512,
             device: str | torch.device | None = None) -> dict[str, float]:
    """Every term of ``model.loss`` over (x, y): the mean over samples (per-batch values
    weighted by batch size), except for the terms of a model's ``pooled_terms``.

    Some terms are no mean over samples (a VQ-VAE's perplexity is a function of the whole
    set's code histogram). A model with ``loss_and_statistics(x, y)`` -> (terms, additive
    statistics of the batch) and ``pooled_terms(summed statistics)`` -> terms gets those terms
    computed from the statistics summed over all batches, so that they do not depend on
    ``batch_size``.
    """
    batch_size = positive_int("batch_size", batch_size)
    device = device or next(model.parameters()).device
    x = _as_tensor(x, "x", _param_dtype(model))
    y = _as_tensor(y, "y")
    if len(x) == 0:
        raise ValueError("x holds no samples: nothing to evaluate")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or Inf")  # as fit says; its loss would read NaN
    pooled = hasattr(model, "loss_and_statistics") and hasattr(model, "pooled_terms")
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    stats: dict[str, torch.Tensor] = {}
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device)
            yb = None if y is None else y[i:i + batch_size].to(device)
            if pooled:
                terms, batch_stats = model.loss_and_statistics(xb, yb)
                for k, v in batch_stats.items():
                    stats[k] = stats[k] + v if k in stats else v
            else:
                terms = model.loss(xb, yb)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(xb)
        out = {k: v / len(x) for k, v in sums.items()}
        if pooled:
            out.update({k: float(v) for k, v in model.pooled_terms(stats).items()})
    finally:
        model.train(was_training)
    return out


class Trainer:
    """Adam on mini-batches with a validation split.

    ``fit(x, y=None)`` takes normalised inputs (N, ...) and optional labels (N,) and returns the
    history: one record per epoch with ``train_loss``, ``val_loss`` and every other loss term.
    With ``checkpoint_dir`` each epoch ends in a checkpoint, and ``resume=True`` continues
    from the newest one: weights, Adam moments, RNG states (the model's own too, where it has
    ``rng_state``/``set_rng_state``) and early-stopping state are restored, but ``lr`` and
    ``weight_decay`` are this Trainer's, not the checkpoint's. The checkpoint must come from a
    model of the same family and config (ValueError otherwise); a fresh run (``resume=False``)
    refuses a ``checkpoint_dir`` that already holds a run's checkpoints. Inputs are cast to the
    model's parameter dtype.
    """

    def __init__(self, model: torch.nn.Module, *, lr: float = 1e-3, batch_size: int = 128,
                 epochs: int = 10, val_fraction: float = 0.1, seed: int = 0,
                 weight_decay: float = 0.0, patience: int | None = None,
                 corruption: Corruption | None = None, amp: bool = False,
                 device: str | torch.device | None = None, progress: bool = True,
                 checkpoint_dir: str | os.PathLike | None = None):
        number("lr", lr, lo_open=True)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        for name, value, low in (("batch_size", batch_size, 1), ("epochs", epochs, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        number("val_fraction", val_fraction, 0.0, 1.0)
        number("weight_decay", weight_decay)
        if patience is not None:
            positive_int("patience", patience)
        for name, flag in (("amp", amp), ("progress", progress)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if corruption is not None and not callable(corruption):
            raise TypeError(f"corruption must be a function (x, generator) -> x or None, got "
                            f"{type(corruption).__name__} (aecore.corruption.parse_corruption "
                            "turns a spec such as 'gaussian:0.1' into one)")
        try:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available()
                                                  else "cpu"))
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a device such as 'cpu' or 'cuda', got "
                             f"{device!r}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} needs CUDA, which this machine lacks")
        self.model = model.to(self.device)
        self.lr, self.weight_decay = lr, weight_decay
        self.batch_size, self.epochs = batch_size, epochs
        self.val_fraction, self.seed, self.patience = val_fraction, seed, patience
        self.corruption = corruption
        if amp and self.device.type != "cuda":
            warnings.warn(f"amp applies bf16 autocast on CUDA only; training on "
                          f"{self.device.type} runs in float32", stacklevel=2)
        self.amp = amp and self.device.type == "cuda"
        self.progress = progress
        self.checkpoint_dir = (check_output_dir(checkpoint_dir, "checkpoint_dir")
                               if checkpoint_dir else None)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.history: list[dict] = []
        self.rank, self.world = init_distributed()

    # -- helpers ---------------------------------------------------------------------------------

    def _split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(n * self.val_fraction)) if self.val_fraction > 0 else 0
        if self.val_fraction > 0 and n_val == 0:
            n_val = 1
        if n - n_val < 1:
            raise ValueError(f"x has {n} samples: too few for val_fraction={self.val_fraction}")
        return order[n_val:], order[:n_val]

    def _rng_state(self, shuffle: torch.Generator, noise: torch.Generator) -> dict:
        state = {"shuffle": shuffle.get_state(), "noise": noise.get_state(),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        if hasattr(self.model, "rng_state"):  # e.g. the VQ-VAE's dead-code re-seeding
            state["model"] = self.model.rng_state()
        return state

    def _nonfinite(self) -> str | None:
        """The first parameter or buffer holding NaN/Inf, or None."""
        for k, v in self.model.state_dict().items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                return k
        return None

    def _diverged(self, what: str, where: str, last_good: Path | None) -> TrainingDiverged:
        kept = f"; the last good checkpoint is {last_good}" if last_good else ""
        return TrainingDiverged(f"{what} {where}; training stopped{kept}. "
                                f"Try a lower learning rate (lr={self.lr}).")

    def _sync_grads(self) -> None:
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.world

    def _check_resumable(self, folder: Path, state: dict, run: dict) -> None:
        """ValueError unless the checkpoint's run is this one's and ends at or before its
        epochs (resuming past them would hand back the longer run's model untouched)."""
        _check_same_run(folder, state.get("run"), run)
        if isinstance(state.get("epoch"), int) and state["epoch"] > self.epochs:
            raise ValueError(f"checkpoint {folder} is at epoch {state['epoch']}, past "
                             f"epochs={self.epochs}: nothing to train; raise epochs to train "
                             "on from it, or train afresh without resume")

    def _step(self, xb, yb, noise: torch.Generator) -> dict[str, torch.Tensor]:
        inp = self.corruption(xb, noise) if self.corruption is not None else xb
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            terms = self.model.loss(inp, yb, target=xb)
        loss = terms["loss"]
        finite = bool(torch.isfinite(loss))
        if self.world > 1:
            # Ranks agree before the gradient all_reduce: one that stopped alone would leave
            # the others waiting in it forever.
            flag = torch.tensor([1.0 if finite else 0.0], device=loss.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if finite and not flag.item():
                return {**terms, "loss": torch.full_like(loss, math.nan)}
        if not finite:
            return terms
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            self._sync_grads()
        self.optimizer.step()
        return terms

    # -- the loop -------------------------------------------------------------------------------

    def fit(self, x, y=None, resume: bool = False) -> list[dict]:
        """Train on normalised inputs ``x`` (N, ...) with optional labels ``y`` (N,)."""
        if not isinstance(resume, bool):
            raise TypeError(f"resume must be a bool, got {resume!r}")
        x = _as_tensor(x, "x", _param_dtype(self.model))
        y = _as_tensor(y, "y")
        if x.dim() == 0:
            raise ValueError("x must be a batch of samples (N, ...), got a 0-d tensor")
        if y is not None and y.dim() == 0:
            # Labels (N,) or a geometry model's targets (N, latent_dim).
            raise ValueError("y must hold one entry per sample (N, ...), got a 0-d tensor")
        if y is not None and len(y) != len(x):
            raise ValueError(f"y must have one label per sample: x has {len(x)}, y has {len(y)}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or Inf")
        if y is not None and y.is_floating_point() and not torch.isfinite(y).all():
            raise ValueError("y contains NaN or Inf")
        if not resume and self.checkpoint_dir is not None and holds_checkpoints(
                self.checkpoint_dir):
            # A fresh run would prune that run's checkpoints as if they were its own.
            raise ValueError(f"checkpoint_dir {str(self.checkpoint_dir)!r} holds another run's "
                             "checkpoints: pass resume=True to continue it, or an empty folder")
        train_idx, val_idx = self._split(len(x))
        if len(train_idx) < self.world:
            raise ValueError(f"{len(train_idx)} training samples are too few for "
                             f"{self.world} processes: every rank needs one per step")
        shuffle = torch.Generator().manual_seed(self.seed + 1)
        noise = torch.Generator(device=self.device).manual_seed(self.seed + 2)
        # What fixes the train/validation split: a resume must see the same, or epochs of the
        # earlier run would have trained on what is now validation data.
        run = {"seed": self.seed, "val_fraction": self.val_fraction, "samples": len(x),
               "sample_shape": list(x.shape[1:]),
               "data_sum": float(x.sum(dtype=torch.float64))}
        start, best, bad_epochs, best_state = 1, math.inf, 0, None
        self.history = []  # this run's (a resumed run's own from its checkpoint)
        last_good = None  # the newest checkpoint of this run known to hold finite weights

        if self.world > 1:
            for p in self.model.state_dict().values():
                dist.broadcast(p, src=0)
        if resume:
            if self.checkpoint_dir is None:
                raise ValueError("resume=True needs checkpoint_dir")
            folder = latest_checkpoint(self.checkpoint_dir)
            if folder is not None:
                state, rng = load_checkpoint(
                    folder, self.model, self.optimizer,
                    lambda s: self._check_resumable(folder, s, run))
                last_good = folder
                # The optimizer state brought the old run's hyperparameters: this Trainer's win.
                for group in self.optimizer.param_groups:
                    group["lr"], group["weight_decay"] = self.lr, self.weight_decay
                shuffle.set_state(rng["shuffle"])
                if rng["noise"].numel() == noise.get_state().numel():
                    noise.set_state(rng["noise"])
                else:  # a generator of another device type (a GPU run resumed on a CPU)
                    warnings.warn(f"checkpoint {folder} was written on another kind of device: "
                                  "the input noise (corruption) continues from a fresh seed, "
                                  "not where that run left it", stacklevel=2)
                    noise.manual_seed(self.seed + 2 + state["epoch"])
                torch.set_rng_state(rng["torch"])
                if "cuda" in rng and torch.cuda.is_available():
                    torch.cuda.set_rng_state(rng["cuda"])
                if "model" in rng and hasattr(self.model, "set_rng_state"):
                    self.model.set_rng_state(rng["model"])
                self.history = state["history"]
                start, best, bad_epochs = state["epoch"] + 1, state["best"], state["bad_epochs"]
                best_state = load_best(folder) if self.patience is not None else None
                if self.patience is not None and bad_epochs >= self.patience:
                    start = self.epochs + 1  # that run had stopped early: so does this one

        self.model.train()
        for epoch in range(start, self.epochs + 1):
            t0 = time.perf_counter()
            perm = train_idx[torch.randperm(len(train_idx), generator=shuffle)]
            # Every rank walks the same permutation and takes its own slice of each batch.
            batches = [perm[i:i + self.batch_size * self.world]
                       for i in range(0, len(perm), self.batch_size * self.world)]
            if len(batches) > 1 and len(batches[-1]) < self.world:
                # A tail too short to give every rank a sample joins the batch before it: a
                # rank with nothing to do would skip the step's gradient all_reduce.
                batches[-2:] = [torch.cat(batches[-2:])]
            sums: dict[str, float] = {}
            seen = 0
            # The per-batch bar only where it redraws in place (a terminal, a notebook): in a
            # log file it would be a line every tenth of a second. Epoch lines print anyway.
            live = ("notebook" in tqdm.__module__
                    or bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty()))
            bar = tqdm(batches, desc=f"epoch {epoch}/{self.epochs}", leave=False,
                       disable=not (self.progress and live) or self.rank != 0)
            for step, idx in enumerate(bar):
                idx = idx[self.rank::self.world]
                xb = x[idx].to(self.device, non_blocking=True)
                yb = None if y is None else y[idx].to(self.device, non_blocking=True)
                terms = self._step(xb, yb, noise)
                if not torch.isfinite(terms["loss"]):
                    raise self._diverged(f"loss became {terms['loss'].detach().item()}",
                                         f"at epoch {epoch}, step {step + 1}", last_good)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
                seen += len(idx)
                bar.set_postfix(loss=f"{sums['loss'] / seen:.4g}")
            record: dict[str, float] = {"epoch": epoch}
            if self.world > 1:
                # On the training device: NCCL reduces CUDA tensors only.
                packed = torch.tensor([seen, *sums.values()], dtype=torch.float64,
                                      device=self.device)
                dist.all_reduce(packed)
                seen, sums = int(packed[0]), dict(zip(sums, packed[1:].tolist()))
            record.update({f"train_{k}": v / max(seen, 1) for k, v in sums.items()})
            if len(val_idx):
                val_y = None if y is None else y[val_idx]
                val = evaluate(self.model, x[val_idx], val_y, device=self.device)
                self.model.train()
                record.update({f"val_{k}": v for k, v in val.items()})
                after = val["loss"]
            else:
                # No validation loss shows the last step's effect: score the last batch (the
                # whole batch, the same on every rank, so that all ranks agree).
                last = batches[-1]
                after = evaluate(self.model, x[last], None if y is None else y[last],
                                 device=self.device)["loss"]
                self.model.train()
            record["time_s"] = time.perf_counter() - t0
            # The guard above sees losses before each step only; the last step may still have
            # diverged, and its weights must not become a checkpoint.
            bad = self._nonfinite()
            if bad is not None or not math.isfinite(after):
                what = f"{bad} became non-finite" if bad else f"loss became {after}"
                raise self._diverged(what, f"after epoch {epoch}", last_good)
            self.history.append(record)
            if self.rank == 0 and self.progress:
                terms_txt = "  ".join(f"{k}={v:.5g}" for k, v in record.items()
                                      if k not in ("epoch", "time_s"))
                tqdm.write(f"epoch {epoch}/{self.epochs}  {terms_txt}  ({record['time_s']:.1f}s)")

            monitor = record.get("val_loss", record["train_loss"])
            if monitor < best:
                best, bad_epochs = monitor, 0
                if self.patience is not None:
                    best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            else:
                bad_epochs += 1
            if self.checkpoint_dir is not None and self.rank == 0:
                last_good = save_checkpoint(
                    self.checkpoint_dir, epoch, self.model, self.optimizer,
                    self._rng_state(shuffle, noise),
                    {"history": self.history, "best": best, "bad_epochs": bad_epochs,
                     "run": run},
                    best=best_state)
            if self.patience is not None and bad_epochs >= self.patience:
                if self.rank == 0 and self.progress:
                    tqdm.write(f"early stopping: val_loss has not improved for {bad_epochs} epochs")
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        self.model.eval()
        return list(self.history)
