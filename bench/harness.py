"""Interleaved timing: every variant of a case runs round-robin in one process, so that
ratios between them are not skewed by the machine's drift. Medians, never means."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 20, warmup: int = 3,
                device: str = "cpu") -> dict[str, dict[str, float]]:
    """Time each fn ``rounds`` times, round-robin; return per-name median/min/max seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        # Rotate which variant goes first: the first of a round tends to run a little slower.
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            if device == "cuda":
                # CUDA events time the device work, not Python's launch overhead around it.
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) * 1e-3)
                continue
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
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


def record(benchmark, *, kernel: str, case: str, mode: str,
           stats: dict[str, dict[str, float]], size: float | None = None,
           flops: float | None = None, bytes_moved: float | None = None,
           compile_s: float | None = None, peak_bytes: dict[str, float] | None = None,
           device: str = "cpu") -> dict:
    """Attach one case's interleaved measurements to ``benchmark.extra_info`` in the schema the
    report (aecore bench) reads, and print a one-line summary.

    ``stats``: per-variant {"median", "min", "max"} seconds from :func:`interleaved`;
    ``flops`` / ``bytes_moved``: work of one call, for achieved rates against the ceilings;
    ``size``: the x coordinate of time-vs-size plots.
    """
    info = {"kernel": kernel, "case": case, "mode": mode, "device": device, "stats": stats,
            "size": size, "flops": flops, "bytes": bytes_moved, "compile_s": compile_s,
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
    import os

    return os.environ.get("AECORE_BENCH_QUICK", "0") not in ("", "0")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
