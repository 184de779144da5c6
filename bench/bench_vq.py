"""Nearest-code search: aecore's vq_nearest vs eager torch (torch.cdist + argmin, and the
expanded-form matmul + argmin) and torch.compile of the expanded form, interleaved in one
process (ratios, never time asserts).

On a CPU, ``vq_nearest`` runs its torch reference (the expanded form), so "aecore" and
"eager_matmul" are the same math there; the fused Triton kernel runs on CUDA tensors only.
"""

from __future__ import annotations

import time

import pytest
import torch

from aecore.kernels.vq import vq_nearest
from bench.harness import device, interleaved, quick, record, rounds_for

CASES = [(4096, 512, 64), (65536, 1024, 64)]


def _eager_cdist(x: torch.Tensor, codebook: torch.Tensor):
    idx = torch.cdist(x, codebook).argmin(dim=1)
    return idx, (x - codebook[idx]).pow(2).sum(1)


def _eager_matmul(x: torch.Tensor, codebook: torch.Tensor):
    # The full N x K distance matrix, as most VQ-VAE code computes it.
    d = x.pow(2).sum(1, keepdim=True) - 2.0 * x @ codebook.t() + codebook.pow(2).sum(1)
    idx = d.argmin(dim=1)
    return idx, d.gather(1, idx[:, None]).squeeze(1)


@pytest.mark.parametrize("shape", CASES, ids=[f"{n}x{k}x{d}" for n, k, d in CASES])
def bench_vq_nearest(benchmark, shape):
    if quick() and shape != CASES[0]:
        pytest.skip("--quick runs the first size only")
    dev = device()
    N, K, D = shape
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, D, device=dev, generator=g)
    codebook = torch.randn(K, D, device=dev, generator=g)
    compiled = torch.compile(_eager_matmul)

    def call(fn):
        def run():
            with torch.no_grad():
                fn(x, codebook)
        return run

    fns = {"aecore": call(vq_nearest), "eager_cdist": call(_eager_cdist),
           "eager_matmul": call(_eager_matmul), "compile": call(compiled)}
    t0 = time.perf_counter()
    fns["compile"]()  # compile outside the timed rounds
    if dev == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    full_rounds = 30 if N * K <= 4096 * 512 else 10
    stats = interleaved(fns, rounds=rounds_for(benchmark, full_rounds), warmup=2, device=dev)
    peak = None
    if dev == "cuda":
        peak = {}
        for name, fn in fns.items():
            torch.cuda.reset_peak_memory_stats()
            fn()
            peak[name] = float(torch.cuda.max_memory_allocated())
    # The fused kernel reads x and the codebook and writes indices and distances; the eager
    # forms also write and read the N x K matrix.
    moved = (N * D + K * D) * x.element_size() + N * 12
    record(benchmark, kernel="vq_nearest", case=f"{N}x{K}x{D}", mode="forward", stats=stats,
           size=N * K, flops=2.0 * N * K * D, bytes_moved=moved, compile_s=compile_s,
           peak_bytes=peak, device=dev)
    benchmark.pedantic(fns["aecore"], rounds=1, iterations=1)
