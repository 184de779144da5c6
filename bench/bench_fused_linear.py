"""fused_linear (GEMM + bias + activation) vs eager (F.linear + activation) vs torch.compile of
eager, in forward, backward and full (forward + backward) modes over a sweep of batch sizes.

The variants run interleaved in one process (bench/harness.py); medians, speedups and peak
memory go to ``benchmark.extra_info``. torch.compile's first call (the compile) is timed apart
and never mixed into step times. On a CUDA machine the same code runs on the GPU (aecore then
takes its Triton kernels); on CPU, aecore runs its torch backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aecore.kernels.fused_linear import fused_linear
from bench.harness import MODES, compiled, device, in_mode, quick, run_case

DEVICE = device()
# (batch, in_features, out_features): a batch sweep of the first layer of an MNIST encoder,
# then a tall narrow layer.
SHAPES = [(64, 784, 512), (256, 784, 512), (1024, 784, 512), (4096, 512, 128)]
QUICK_SHAPES = [(256, 784, 512)]
EAGER_ACT = {"relu": torch.relu, "sigmoid": torch.sigmoid}
# GEMMs a mode runs: the forward one; dX and dW in the backward.
GEMMS = {"forward": 1, "backward": 2, "full": 3}


def _eager(x, w, b, act: str):
    return EAGER_ACT[act](F.linear(x, w, b))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", list(EAGER_ACT))
@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"{m}x{k}-{n}" for m, k, n in SHAPES])
def bench_fused_linear(benchmark, m, k, n, act, mode):
    if quick() and (m, k, n) not in QUICK_SHAPES:
        pytest.skip("--quick runs one size")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE).requires_grad_()
    b = torch.zeros(n, device=DEVICE, requires_grad=True)
    grad = torch.randn(m, n, generator=g).to(DEVICE)
    leaves = (x, w, b)
    comp, compile_s = compiled(("fused_linear", m, k, n, act), _eager,
                               lambda f: f(x, w, b, act).backward(grad))
    calls = {"aecore": lambda: fused_linear(x, w, b, act),
             "eager": lambda: _eager(x, w, b, act),
             "compile": lambda: comp(x, w, b, act)}
    fns = {name: in_mode(mode, call, leaves, [grad]) for name, call in calls.items()}
    work = m * k * n
    rounds = 15 if quick() else (90 if work <= 256 * 784 * 512 else 30)
    run_case(benchmark, fns, rounds=rounds, kernel="fused_linear",
             case=f"{m}x{k}->{n} {act}", series=f"{k}->{n} {act}", mode=mode,
             size=float(work), flops=GEMMS[mode] * 2.0 * work, compile_s=compile_s)
