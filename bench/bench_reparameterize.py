"""reparameterize (z and the KL term) vs eager PyTorch and torch.compile of it, in forward,
backward and full modes over a sweep of sizes.

Eager is the textbook ``mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)`` with
``-0.5 * sum(1 + logvar - mu^2 - exp(logvar))``. The variants run interleaved in one process
(bench/harness.py); medians and speedups go to ``benchmark.extra_info``. Besides time and peak
memory, the bytes each variant keeps for its backward are measured with saved_tensors_hooks
(numel * element_size, deduplicated by storage): aecore keeps mu and logvar (exp(0.5 logvar) on
its eager CPU path) and redraws eps from the seed, eager keeps eps, exp(0.5 logvar),
exp(logvar) and mu. Both counts include the inputs the graph keeps;
``saved_bytes_beyond_inputs`` leaves mu's and logvar's storages out (what each variant adds to
the inputs' memory). torch.compile's first call is timed apart. On CPU aecore runs its torch
backend; on CUDA its Triton kernels. Redrawing costs aecore one more draw than eager in full
mode, so each case also times one ``torch.randn_like(mu)`` alone (``draw_s``).
"""

from __future__ import annotations

import pytest
import torch

from aecore.kernels.reparameterize import reparameterize
from bench.harness import MODES, compiled, device, in_mode, interleaved, quick, rounds_for, run_case

DEVICE = device()
SHAPES = [(256, 32), (4096, 64), (65536, 128)]
QUICK_SHAPES = [(256, 32), (65536, 128)]
# Bytes one call reads and writes: forward mu, logvar -> z (+ kl); backward gz, mu, logvar
# (+ gkl) -> dmu, dlogvar; fp32.
PASSES = {"forward": 3, "backward": 5, "full": 8}


def eager(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
    return z, kl


def saved_bytes(fn, mu: torch.Tensor, logvar: torch.Tensor,
                inputs: bool = True) -> int:
    """Bytes of the distinct storages that fn's autograd graph keeps for the backward; with
    ``inputs=False`` only those beyond mu's and logvar's (which exist whatever fn keeps)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Whole storages, once each: a view of a kept tensor costs nothing more.
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(mu, logvar)
    del out
    if not inputs:
        for t in (mu, logvar):
            storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,d", SHAPES, ids=[f"{b}x{d}" for b, d in SHAPES])
def bench_reparameterize(benchmark, b, d, mode):
    if quick() and (b, d) not in QUICK_SHAPES:
        pytest.skip("--quick runs two sizes")
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(b, d, generator=g).to(DEVICE).requires_grad_()
    logvar = (0.5 * torch.randn(b, d, generator=g)).to(DEVICE).requires_grad_()
    grads = [torch.randn(b, d, generator=g).to(DEVICE), torch.randn(b, generator=g).to(DEVICE)]
    comp, compile_s = compiled(("reparameterize", b, d), eager, lambda f: torch.autograd.backward(
        f(mu, logvar), grads))
    calls = {"aecore": lambda: reparameterize(mu, logvar), "eager": lambda: eager(mu, logvar),
             "compile": lambda: comp(mu, logvar)}
    fns = {name: in_mode(mode, call, (mu, logvar), grads) for name, call in calls.items()}
    rounds = 20 if quick() else (200 if b * d < 100_000 else 40)
    info = run_case(benchmark, fns, rounds=rounds, warmup=5, kernel="reparameterize",
                    case=f"{b}x{d}", mode=mode,
                    size=float(b * d), bytes_moved=float(b * d * 4 * PASSES[mode]),
                    compile_s=compile_s)
    draw = interleaved({"draw": lambda: torch.randn_like(mu)}, rounds=rounds_for(benchmark, rounds),
                       device=DEVICE)["draw"]["median"]
    benchmark.extra_info["draw_s"] = draw
    kept = {"aecore": saved_bytes(reparameterize, mu, logvar),
            "eager": saved_bytes(eager, mu, logvar)}
    benchmark.extra_info["saved_bytes"] = kept
    benchmark.extra_info["saved_ratio_vs_eager"] = kept["aecore"] / kept["eager"]
    # The same without the inputs, which both variants hold anyway: what each adds.
    extra = {"aecore": saved_bytes(reparameterize, mu, logvar, inputs=False),
             "eager": saved_bytes(eager, mu, logvar, inputs=False)}
    benchmark.extra_info["saved_bytes_beyond_inputs"] = extra
    benchmark.extra_info["saved_beyond_inputs_ratio_vs_eager"] = extra["aecore"] / extra["eager"]
    print(f"[reparameterize] {b}x{d} saved for backward: aecore={kept['aecore']} B "
          f"eager={kept['eager']} B ratio={kept['aecore'] / kept['eager']:.2f} (beyond the "
          f"inputs: {extra['aecore']} B vs {extra['eager']} B); "
          f"speedup_vs_eager={info.get('speedup_vs_eager', float('nan')):.2f}; one draw of eps "
          f"{draw * 1e6:.1f} us = {draw / info['stats']['eager']['median']:.2f} of eager's time")
