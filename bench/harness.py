"""Interleaved timing: every variant of a case runs round-robin in one process, so that
ratios between them are not skewed by the machine's drift. Medians, never means."""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable, Sequence

import torch

# Every (case, variant) compiles its own static-shape graph; sweeps need more than the default 8
# graphs per function.
torch._dynamo.config.recompile_limit = 64
# The backward mode reruns one retained graph; compiled backwards that donate their saved
# buffers refuse retain_graph, and torch.compile's cache shares one graph between the modes of a
# case, so the whole suite compiles without donation (which only lets a backward reuse memory
# in place; the report says so).
torch._functorch.config.donated_buffer = False

MODES = ("forward", "backward", "full")


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 20, warmup: int = 3,
                device: str = "cpu", inner: int = 1) -> dict[str, dict[str, float]]:
    """Time each fn ``rounds`` times, round-robin; return per-name median/min/max seconds.

    ``inner`` > 1 times that many back-to-back calls per turn and divides: the steady state of
    a process that runs one model over and over (its weights warm in the caches), rather than
    one call right after the other variants evicted them.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    # A fresh order every round, from a fixed seed. A variant runs slower right after one that
    # touched more memory (up to 40 us after eager's reparameterize at 256 x 32, on a 100 us
    # op), and a fixed cycle, even rotated, gives each variant the same predecessor every round.
    order = random.Random(0)
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            fn = fns[name]
            if device == "cuda":
                # CUDA events on the stream, synchronised every turn: from the call's first
                # launch to its last kernel's end. The stream is idle when the call starts, so
                # host dispatch between launches counts where the GPU waits for it: small ops
                # measure their per-call latency (dispatch-bound), large ones their kernels.
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) * 1e-3 / inner)
                continue
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t)}
        for name, t in times.items()
    }


def ratios(stats: dict[str, dict[str, float]], subject: str = "aecore") -> dict[str, float]:
    """speed of ``subject`` relative to each other variant: median(other) / median(subject);
    above 1 means ``subject`` is faster."""
    base = stats[subject]["median"]
    return {f"speedup_vs_{name}": s["median"] / base
            for name, s in stats.items() if name != subject}


def rounds_for(benchmark, full: int) -> int:
    """One round when pytest-benchmark runs with --benchmark-disable (CI smoke), else ``full``."""
    return 1 if getattr(benchmark, "disabled", False) else full


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def in_mode(mode: str, call: Callable[[], object], leaves: Sequence[torch.Tensor],
            grads: Sequence[torch.Tensor] | None = None) -> Callable[[], None]:
    """A zero-argument function that runs ``call`` (returning a tensor or a tuple of tensors)
    in ``mode``:

    - ``forward``: the forward pass as in training (inputs require grad, autograd records);
    - ``backward``: the backward pass alone, through one graph built here, outside the timing
      (``retain_graph=True`` keeps it for the next call);
    - ``full``: forward then backward.

    ``grads`` are the gradients of the outputs (None for one scalar output). Every backward
    drops the gradients of ``leaves``, so that none accumulates between calls.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def clear() -> None:
        for t in leaves:
            t.grad = None

    if mode == "forward":
        return call
    if mode == "full":
        def full() -> None:
            torch.autograd.backward(_as_tuple(call()), grads)
            clear()
        return full
    outs = _as_tuple(call())

    def backward() -> None:
        torch.autograd.backward(outs, grads, retain_graph=True)
        clear()
    return backward


_COMPILED: dict = {}


def compiled(key, fn: Callable, first_call: Callable[[Callable], object]) -> tuple[Callable, float]:
    """``torch.compile(fn, dynamic=False)`` built once per ``key`` in this process, and the
    seconds its first ``first_call(compiled_fn)`` took: the compile, reported apart from step
    times. ``first_call`` should run forward and backward so that both graphs compile there."""
    if key not in _COMPILED:
        cfn = torch.compile(fn, dynamic=False)
        t0 = time.perf_counter()
        first_call(cfn)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        _COMPILED[key] = (cfn, time.perf_counter() - t0)
    return _COMPILED[key]


def peak_bytes(fn: Callable[[], object], dev: str) -> float:
    """The most bytes one call of ``fn`` holds at once beyond what existed before it.

    CUDA: torch.cuda.max_memory_allocated around the call. CPU: the torch profiler with
    profile_memory=True records every allocation and free of torch's CPU allocator; the running
    sum of those events in time order peaks at the answer (Python-level tools such as
    tracemalloc don't see torch's allocations).
    """
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


def run_case(benchmark, fns: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 3,
             inner: int = 1, memory: bool = True, **fields) -> dict:
    """Time ``fns`` interleaved (``rounds`` of them, one under --benchmark-disable), measure
    each one's peak memory, :func:`record` it all with ``fields`` (kernel, case, mode, size,
    flops, ...), and hand the first variant to pytest-benchmark for one call."""
    dev = device()
    disabled = getattr(benchmark, "disabled", False)
    stats = interleaved(fns, rounds=rounds_for(benchmark, rounds),
                        warmup=1 if disabled else warmup, device=dev, inner=inner)
    peak = {name: peak_bytes(fn, dev) for name, fn in fns.items()} if memory else None
    info = record(benchmark, stats=stats, peak_bytes=peak, device=dev, **fields)
    if peak and "aecore" in peak:
        for name, b in peak.items():
            if name != "aecore":
                info[f"memory_ratio_vs_{name}"] = peak["aecore"] / max(b, 1.0)
        benchmark.extra_info.update(info)
    benchmark.pedantic(next(iter(fns.values())), rounds=1, iterations=1)
    return info


def record(benchmark, *, kernel: str, case: str, mode: str,
           stats: dict[str, dict[str, float]], size: float | None = None,
           flops: float | None = None, bytes_moved: float | None = None,
           compile_s: float | None = None, peak_bytes: dict[str, float] | None = None,
           device: str = "cpu", series: str | None = None) -> dict:
    """Attach one case's interleaved measurements to ``benchmark.extra_info`` in the schema the
    report (aecore bench) reads, and print a one-line summary.

    ``stats``: per-variant {"median", "min", "max"} seconds from :func:`interleaved`;
    ``flops`` / ``bytes_moved``: work of one call, for achieved rates against the ceilings;
    ``size``: the x coordinate of time-vs-size plots, with one line per ``series`` (the
    case's fixed part, e.g. the activation, when its size varies).
    """
    info = {"kernel": kernel, "case": case, "mode": mode, "device": device, "stats": stats,
            "series": series, "size": size, "flops": flops, "bytes": bytes_moved,
            "compile_s": compile_s,
            "peak_bytes": peak_bytes}
    if "aecore" in stats:
        info.update(ratios(stats))
    benchmark.extra_info.update(info)
    parts = [f"{k}={v['median'] * 1e3:.3f}ms" for k, v in stats.items()]
    parts += [f"{k}={v:.2f}" for k, v in info.items() if k.startswith("speedup_vs_")]
    print(f"[{kernel}] {case} {mode}: " + "  ".join(parts))
    return info


def quick() -> bool:
    """True under ``aecore bench --quick`` (AECORE_BENCH_QUICK=1): fewer sizes and rounds."""
    return os.environ.get("AECORE_BENCH_QUICK", "0") not in ("", "0")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
