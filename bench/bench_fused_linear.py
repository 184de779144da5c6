"""fused_linear forward + backward vs eager (F.linear + activation) vs torch.compile of eager.

The three variants run interleaved in one process (bench/harness.py); medians and speedups go to
``benchmark.extra_info``. torch.compile's first call (the compile) is timed apart and never mixed
into step times. On a CUDA machine the same code runs on the GPU (aecore then takes its Triton
kernels); on CPU, aecore runs its torch backend.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from aecore.kernels.fused_linear import fused_linear
from bench.harness import device, interleaved, quick, record, rounds_for

DEVICE = device()
SHAPES = [(256, 784, 512), (4096, 512, 128)]  # (batch, in_features, out_features)
EAGER_ACT = {"relu": torch.relu, "sigmoid": torch.sigmoid}


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _rotated(fns: dict, rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    """interleaved() once per rotation of the variant order, ``rounds`` split between them;
    per variant: median of the rotations' medians, min of mins, max of maxes.

    On this host the variant that runs first in a round measured a few percent slower whatever
    it was (the one before it leaves the caches and allocator in its own state), so every
    variant gets each position equally often.
    """
    names = list(fns)
    per = max(1, rounds // len(names))
    runs = []
    for i in range(len(names)):
        order = names[i:] + names[:i]
        runs.append(interleaved({n: fns[n] for n in order}, rounds=per, warmup=warmup,
                                device=DEVICE))
        warmup = min(warmup, 1)
    return {n: {"median": statistics.median(r[n]["median"] for r in runs),
                "min": min(r[n]["min"] for r in runs),
                "max": max(r[n]["max"] for r in runs)} for n in names}


@pytest.mark.parametrize("act", list(EAGER_ACT))
@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"{m}x{k}-{n}" for m, k, n in SHAPES])
def bench_fused_linear_fwd_bwd(benchmark, m, k, n, act):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE).requires_grad_()
    b = torch.zeros(n, device=DEVICE, requires_grad=True)
    grad = torch.randn(m, n, generator=g).to(DEVICE)
    act_fn = EAGER_ACT[act]

    def eager(x, w, b):
        return act_fn(F.linear(x, w, b))

    def ours(x, w, b):
        return fused_linear(x, w, b, act)

    compiled = torch.compile(eager)

    def step(fn):
        def run():
            fn(x, w, b).backward(grad)
            x.grad = w.grad = b.grad = None
        return run

    fns = {"aecore": step(ours), "eager": step(eager), "compile": step(compiled)}
    _sync()
    t0 = time.perf_counter()
    fns["compile"]()  # compiles forward and backward graphs
    _sync()
    compile_s = time.perf_counter() - t0

    disabled = getattr(benchmark, "disabled", False)
    stats = _rotated(fns, rounds=rounds_for(benchmark, 15 if quick() else 90),
                     warmup=1 if disabled else 3)
    record(benchmark, kernel="fused_linear", case=f"{m}x{k}->{n} {act}", mode="fwd+bwd",
           stats=stats, size=float(m * k * n), flops=3 * 2.0 * m * k * n,
           compile_s=compile_s, device=DEVICE)
    benchmark.pedantic(fns["aecore"], rounds=rounds_for(benchmark, 5), iterations=1)
