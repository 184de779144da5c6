"""Contractive penalty, forward + backward (gradients for every weight and bias): aecore's op vs
the penalty from torch.func.vmap(torch.func.jacrev(encoder)) and torch.compile of that, at
B = 256, d = 784. Time and peak-memory ratios come from one interleaved run (never asserted).

Peak memory: on CUDA, torch.cuda.max_memory_allocated around one call. On CPU, the torch
profiler with profile_memory=True records every allocation and free made by torch's CPU
allocator; the running sum of those events, in time order, peaks at the most bytes the call
held at once beyond what existed before it (inputs and parameters are common to all variants
and not counted). Python-level tools (tracemalloc) don't see torch's allocations.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from aecore.kernels._activations import act_torch
from aecore.kernels.contractive import contractive_penalty, plan
from bench.harness import device, interleaved, quick, record, rounds_for

BATCH = 256
# (name, dims, activations): one wide layer, the usual MNIST encoder, a shallow one.
CASES = [
    ("784-1024", [784, 1024], ["sigmoid"]),
    ("784-512-128-32", [784, 512, 128, 32], ["relu", "relu", "identity"]),
    ("784-256-64", [784, 256, 64], ["relu", "identity"]),
]


def _params(dims, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    ws = [(torch.randn(o, i, device=dev, generator=g) / i**0.5).requires_grad_()
          for i, o in zip(dims, dims[1:])]
    bs = [(0.1 * torch.randn(o, device=dev, generator=g)).requires_grad_() for o in dims[1:]]
    x = torch.rand(BATCH, dims[0], device=dev, generator=g)
    return x, ws, bs


class _Skipped(Exception):
    pass


def _jacrev_penalty(x, ws, bs, acts):
    def f(v):
        for w, b, act in zip(ws, bs, acts):
            v = act_torch(F.linear(v, w, b), act)
        return v
    return torch.func.vmap(torch.func.jacrev(f))(x).pow(2).sum(dim=(1, 2))


def _step(fn, x, ws, bs, acts):
    params = [*ws, *bs]

    def run():
        for p in params:
            p.grad = None
        fn(x, ws, bs, acts).mean().backward()
    return run


def _peak_bytes(fn, dev: str) -> float:
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return float(peak)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def bench_contractive(benchmark, case):
    name, dims, acts = case
    if quick() and name != CASES[1][0]:
        pytest.skip("--quick runs the 784-512-128-32 case only")
    dev = device()
    x, ws, bs = _params(dims, dev)
    fns = {"aecore": _step(contractive_penalty, x, ws, bs, acts),
           "jacrev": _step(_jacrev_penalty, x, ws, bs, acts)}
    # The one-layer Jacobian is (256, 1024, 784): vmap(jacrev) takes ~20 s a call on 2 CPU
    # cores (and 5 GB), so that case gets few rounds, and its CI smoke pass (one round) skips
    # torch.compile and the memory profile of the baselines.
    slow = dev == "cpu" and len(dims) == 2
    rounds = rounds_for(benchmark, 3 if slow else 15)
    smoke_slow = slow and rounds == 1
    compile_s, compile_error = None, None
    if smoke_slow:
        compile_error = "skipped in the one-round pass"
    try:
        if smoke_slow:
            raise _Skipped
        compiled = torch.compile(_jacrev_penalty)
        t0 = time.perf_counter()
        _step(compiled, x, ws, bs, acts)()  # compile outside the timed rounds
        compile_s = time.perf_counter() - t0
        fns["compile"] = _step(compiled, x, ws, bs, acts)
    except _Skipped:
        pass
    except Exception as exc:  # report, don't fail: torch.compile may not take vmap(jacrev)
        compile_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(f"[contractive] {name}: torch.compile of vmap(jacrev) failed: {compile_error}")
    warmup = 0 if rounds == 1 or slow else 2
    stats = interleaved(fns, rounds=rounds, warmup=warmup, device=dev)
    peak = {k: _peak_bytes(fn, dev) for k, fn in fns.items()
            if not (smoke_slow and k != "aecore")}
    info = record(benchmark, kernel="contractive", case=f"B{BATCH}-{name}", mode="full",
                  stats=stats, size=BATCH * dims[0], compile_s=compile_s, peak_bytes=peak,
                  device=dev)
    info["order"] = plan(BATCH, dims)
    info["compile_error"] = compile_error
    for other in peak:
        if other != "aecore":
            info[f"memory_ratio_vs_{other}"] = peak["aecore"] / max(peak[other], 1.0)
    benchmark.extra_info.update(info)
    print(f"[contractive] {name} ({info['order']}): peak MiB "
          + "  ".join(f"{k}={v / 2**20:.1f}" for k, v in peak.items())
          + "  " + "  ".join(f"{k}={v:.3f}" for k, v in info.items()
                             if k.startswith("memory_ratio")))
    benchmark.pedantic(fns["aecore"], rounds=1, iterations=1)
