"""KL sparsity penalty, forward + backward: aecore's fused op vs the eager torch formula and
torch.compile of the same formula, interleaved in one process (ratios, never time asserts)."""

from __future__ import annotations

import time

import pytest
import torch

from aecore.kernels.sparsity import kl_sparsity, kl_sparsity_reference
from bench.harness import device, interleaved, quick, record, rounds_for

RHO = 0.05
CASES = [(256, 1024), (4096, 512)]


def _step(fn, h: torch.Tensor):
    """One training-style call: the penalty and its gradient with respect to h."""
    def run():
        h.grad = None
        fn(h, RHO).backward()
    return run


def _forward(fn, h: torch.Tensor):
    def run():
        with torch.no_grad():
            fn(h, RHO)
    return run


@pytest.mark.parametrize("mode", ["full", "forward"])
@pytest.mark.parametrize("shape", CASES, ids=[f"{b}x{n}" for b, n in CASES])
def bench_kl_sparsity(benchmark, shape, mode):
    if quick() and shape != CASES[0]:
        pytest.skip("--quick runs the first size only")
    dev = device()
    B, H = shape
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.rand(B, H, device=dev, generator=g).mul_(0.2).requires_grad_()
    compiled = torch.compile(kl_sparsity_reference)
    wrap = _step if mode == "full" else _forward
    fns = {"aecore": wrap(kl_sparsity, h), "eager": wrap(kl_sparsity_reference, h),
           "compile": wrap(compiled, h)}
    t0 = time.perf_counter()
    fns["compile"]()  # compile outside the timed rounds
    if dev == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    stats = interleaved(fns, rounds=rounds_for(benchmark, 50), warmup=3, device=dev)
    peak = None
    if dev == "cuda":
        peak = {}
        for name, fn in fns.items():
            torch.cuda.reset_peak_memory_stats()
            fn()
            peak[name] = float(torch.cuda.max_memory_allocated())
    # Forward reads h once; the backward writes dh once (the gradient row is per column).
    moved = B * H * h.element_size() * (2 if mode == "full" else 1)
    record(benchmark, kernel="kl_sparsity", case=f"{B}x{H}", mode=mode, stats=stats,
           size=B * H, bytes_moved=moved, compile_s=compile_s, peak_bytes=peak, device=dev)
    benchmark.pedantic(fns["aecore"], rounds=1, iterations=1)
