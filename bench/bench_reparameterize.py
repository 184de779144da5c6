"""reparameterize (z and the KL term) forward + backward vs eager PyTorch and torch.compile of it.

Eager is the textbook ``mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)`` with
``-0.5 * sum(1 + logvar - mu^2 - exp(logvar))``. The variants run interleaved in one process
(bench/harness.py); medians and speedups go to ``benchmark.extra_info``. Besides time, the
bytes each variant keeps for its backward are measured with saved_tensors_hooks (numel *
element_size, deduplicated by storage): aecore keeps mu and logvar (exp(0.5 logvar) on its
eager CPU path) and redraws eps from the seed, eager keeps eps, exp(0.5 logvar), exp(logvar)
and mu. torch.compile's first call is timed
apart. On CPU aecore runs its torch backend; on CUDA its Triton kernels.
"""

from __future__ import annotations

import time

import pytest
import torch

from aecore.kernels.reparameterize import reparameterize
from bench.harness import device, interleaved, quick, record, rounds_for

DEVICE = device()
SHAPES = [(256, 32), (65536, 128)]


def eager(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
    return z, kl


def ours(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reparameterize(mu, logvar)


def saved_bytes(fn, mu: torch.Tensor, logvar: torch.Tensor) -> int:
    """Bytes of the distinct storages that fn's autograd graph keeps for the backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Whole storages, once each: a view of a kept tensor costs nothing more.
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(mu, logvar)
    del out
    return sum(storages.values())


@pytest.mark.parametrize("b,d", SHAPES, ids=[f"{b}x{d}" for b, d in SHAPES])
def bench_reparameterize_fwd_bwd(benchmark, b, d):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(b, d, generator=g).to(DEVICE).requires_grad_()
    logvar = (0.5 * torch.randn(b, d, generator=g)).to(DEVICE).requires_grad_()
    gz = torch.randn(b, d, generator=g).to(DEVICE)
    gkl = torch.randn(b, generator=g).to(DEVICE)
    compiled = torch.compile(eager)

    def step(fn):
        def run():
            z, kl = fn(mu, logvar)
            torch.autograd.backward([z, kl], [gz, gkl])
            mu.grad = logvar.grad = None
        return run

    fns = {"aecore": step(ours), "eager": step(eager), "compile": step(compiled)}
    t0 = time.perf_counter()
    fns["compile"]()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0

    disabled = getattr(benchmark, "disabled", False)
    full = 20 if quick() else (200 if b * d < 100_000 else 40)
    stats = interleaved(fns, rounds=rounds_for(benchmark, full), warmup=1 if disabled else 5,
                        device=DEVICE)
    kept = {"aecore": saved_bytes(ours, mu, logvar), "eager": saved_bytes(eager, mu, logvar)}
    info = record(benchmark, kernel="reparameterize", case=f"{b}x{d}", mode="fwd+bwd",
                  stats=stats, size=float(b * d), bytes_moved=float(b * d * 4 * 6),
                  compile_s=compile_s, device=DEVICE)
    benchmark.extra_info["saved_bytes"] = kept
    benchmark.extra_info["saved_ratio_vs_eager"] = kept["aecore"] / kept["eager"]
    print(f"[reparameterize] {b}x{d} saved for backward: aecore={kept['aecore']} B "
          f"eager={kept['eager']} B ratio={kept['aecore'] / kept['eager']:.2f}; "
          f"speedup_vs_eager={info.get('speedup_vs_eager', float('nan')):.2f}")
    benchmark.pedantic(fns["aecore"], rounds=rounds_for(benchmark, 5), iterations=1)
