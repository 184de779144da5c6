"""Nearest-code search: aecore's vq_nearest vs eager torch (torch.cdist + argmin, and the
expanded-form matmul + argmin) and torch.compile of the expanded form, interleaved in one
process (ratios, never time asserts), over a sweep of batch and codebook sizes.

Forward mode only: the search is an argmin, which has no gradient (the VQ layer passes
gradients straight through around it). On a CPU, ``vq_nearest`` runs its torch reference: the
expanded form with ||c||^2 folded into the GEMM (one addmm, then argmin), where "eager_matmul"
makes separate passes over the N x K scores; the fused Triton kernel runs on CUDA tensors only.
"""

from __future__ import annotations

import pytest
import torch

from aecore.kernels.vq import vq_nearest
from bench.harness import compiled, device, quick, run_case

CASES = [(4096, 512, 64), (16384, 512, 64), (65536, 1024, 64)]


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
    def call(fn):
        def run():
            with torch.no_grad():
                fn(x, codebook)
        return run

    # The first call runs under no_grad as the timed ones do: torch.compile guards on grad
    # mode, so compiling with grad on would leave the real compile to the warmup.
    comp, compile_s = compiled(("vq_nearest", N, K, D), _eager_matmul, lambda f: call(f)())

    fns = {"aecore": call(vq_nearest), "eager_cdist": call(_eager_cdist),
           "eager_matmul": call(_eager_matmul), "compile": call(comp)}
    # The fused kernel reads x and the codebook and writes indices and distances; the eager
    # forms also write and read the N x K matrix.
    moved = (N * D + K * D) * x.element_size() + N * 12
    run_case(benchmark, fns, rounds=30 if N * K <= 4096 * 512 else 10, warmup=2,
             kernel="vq_nearest", case=f"{N}x{K}x{D}", series=f"K{K} D{D}", mode="forward",
             size=N * K, flops=2.0 * N * K * D, bytes_moved=moved, compile_s=compile_s)
