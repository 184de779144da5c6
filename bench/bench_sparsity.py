"""KL sparsity penalty sum_j KL(rho || rho_hat_j): aecore's fused op vs the eager torch formula
and torch.compile of the same formula, in forward, backward and full modes over a sweep of
sizes, interleaved in one process (ratios, never time asserts)."""

from __future__ import annotations

import pytest
import torch

from aecore.kernels.sparsity import kl_sparsity, kl_sparsity_reference
from bench.harness import MODES, compiled, device, in_mode, quick, run_case

RHO = 0.05
CASES = [(256, 1024), (1024, 1024), (4096, 512)]
# Bytes per element a mode moves: the forward reads h; the backward writes dh.
PASSES = {"forward": 1, "backward": 1, "full": 2}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CASES, ids=[f"{b}x{n}" for b, n in CASES])
def bench_kl_sparsity(benchmark, shape, mode):
    if quick() and shape != CASES[0]:
        pytest.skip("--quick runs the first size only")
    dev = device()
    B, H = shape
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.rand(B, H, device=dev, generator=g).mul_(0.2).requires_grad_()
    comp, compile_s = compiled(("kl_sparsity", B, H), kl_sparsity_reference,
                               lambda f: f(h, RHO).backward())
    calls = {"aecore": lambda: kl_sparsity(h, RHO), "eager": lambda: kl_sparsity_reference(h, RHO),
             "compile": lambda: comp(h, RHO)}
    fns = {name: in_mode(mode, call, (h,)) for name, call in calls.items()}
    run_case(benchmark, fns, rounds=50, kernel="kl_sparsity", case=f"{B}x{H}", mode=mode,
             size=B * H, bytes_moved=B * H * h.element_size() * PASSES[mode],
             compile_s=compile_s)
