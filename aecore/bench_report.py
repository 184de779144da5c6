"""``aecore bench``: run the benchmark suite in bench/ and write a report.

The report (report.md) holds medians with min-max, ratios against eager PyTorch and
torch.compile, each kernel's achieved FLOP/s or bytes/s as a fraction of the machine's measured
ceilings, and the ahead-of-time compile table of every Triton kernel config; plots/ holds time
against size and ratio per kernel; raw.json is pytest-benchmark's output.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from aecore.io import check_output_dir, write_bytes, write_json

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def _median_time(fn, reps: int, device: str) -> float:
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ceilings(device: str, quick: bool = False) -> dict[str, float]:
    """The machine's copy bandwidth (bytes/s, read + write) and fp32 matmul rate (FLOP/s)."""
    n_copy = (16 if quick else 64) * 2**20  # float32 elements
    src = torch.empty(n_copy, device=device).uniform_()
    dst = torch.empty_like(src)
    n = 1024 if quick else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    if device == "cuda":
        from triton.testing import do_bench

        copy_s = do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3
        mm_s = do_bench(lambda: a @ b, return_mode="median") * 1e-3
        h = a.half()
        mm16_s = do_bench(lambda: h @ h, return_mode="median") * 1e-3
    else:
        dst.copy_(src)
        a @ b
        copy_s = _median_time(lambda: dst.copy_(src), 5, device)
        mm_s = _median_time(lambda: a @ b, 5, device)
        mm16_s = None
    out = {"copy_bytes_per_s": 2 * 4 * n_copy / copy_s, "matmul_fp32_flops": 2 * n**3 / mm_s}
    if mm16_s:
        out["matmul_fp16_flops"] = 2 * n**3 / mm16_s
    return out


def run_suite(out: Path, quick: bool, only: str | None) -> dict:
    """Run bench/ under pytest-benchmark; return its JSON."""
    if not BENCH_DIR.is_dir():
        raise FileNotFoundError(f"benchmarks live in a source checkout; {BENCH_DIR} is missing")
    raw = out / "raw.json"
    # pytest-benchmark writes its JSON to a fresh name, renamed onto raw.json only when the
    # run succeeds: a failed run (or a --only that matches nothing) keeps the earlier results,
    # and a file left by an earlier run never passes for this one's.
    fresh = out / f".raw-{os.getpid()}.json"
    fresh.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", str(BENCH_DIR), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={fresh}", "-s"]
    if only:
        cmd += ["-k", only]
    env = {**os.environ, "AECORE_BENCH_QUICK": "1" if quick else "0"}
    try:
        proc = subprocess.run(cmd, env=env, cwd=BENCH_DIR.parent)
        if proc.returncode == 5:
            raise ValueError(f"no benchmark matched --only {only!r}" if only
                             else "no benchmark was collected")
        if proc.returncode != 0 or not fresh.is_file():
            raise RuntimeError(f"the benchmark suite failed (pytest exit code {proc.returncode})")
        os.replace(fresh, raw)
    finally:
        fresh.unlink(missing_ok=True)
    return json.loads(raw.read_text())


def aot_table() -> list[dict]:
    """Registers, spills, shared memory and MMA instructions of every Triton kernel config,
    compiled for sm_80 and sm_90 (in a subprocess: the compile needs TRITON_INTERPRET unset)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "aecore.kernels.aot"], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return [{"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}]
    return json.loads(proc.stdout)


def _fmt_s(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _rate(info: dict, ceilings: dict) -> str:
    med = info["stats"].get("aecore", next(iter(info["stats"].values())))["median"]
    if info.get("flops"):
        rate = info["flops"] / med
        peak = ceilings.get("matmul_fp32_flops")
        return f"{rate / 1e9:.1f} GFLOP/s ({100 * rate / peak:.0f}%)" if peak else ""
    if info.get("bytes"):
        rate = info["bytes"] / med
        peak = ceilings["copy_bytes_per_s"]
        return f"{rate / 1e9:.1f} GB/s ({100 * rate / peak:.0f}%)"
    return ""


def render(results: dict, ceilings: dict, aot: list[dict], device: str, elapsed: float) -> str:
    """The markdown report."""
    rows = [b["extra_info"] for b in results.get("benchmarks", [])
            if b.get("extra_info", {}).get("stats")]
    lines = [f"# aecore benchmark report ({device})", "",
             f"Machine ceilings, measured in this run: copy "
             f"{ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), fp32 matmul "
             f"{ceilings['matmul_fp32_flops'] / 1e9:.1f} GFLOP/s"
             + (f", fp16 matmul {ceilings['matmul_fp16_flops'] / 1e12:.1f} TFLOP/s"
                if "matmul_fp16_flops" in ceilings else "") + ".", "",
             "Each case's variants ran interleaved in one process; times are medians (min-max). "
             "'A vs B' = median of B / median of A (above 1: A is faster). Compile times are "
             "measured apart from step times; torch.compile runs without backward buffer "
             "donation, which the backward-only mode's retained graph does not allow.", "",
             f"Suite time: {elapsed:.0f} s.", ""]
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == kernel]
        variants = list(dict.fromkeys(v for r in mine for v in r["stats"]))
        subject = "aecore" if "aecore" in variants else variants[0]
        others = [v for v in variants if v != subject]
        head = ["case", "mode", *variants, *(f"{subject} vs {v}" for v in others), "achieved",
                "compile time"]
        lines += [f"## {kernel}", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for r in mine:
            st = r["stats"]
            cells = [r["case"], r["mode"]]
            for v in variants:
                s_ = st.get(v)
                cells.append(f"{_fmt_s(s_['median'])} ({_fmt_s(s_['min'])}-{_fmt_s(s_['max'])})"
                             if s_ else "-")
            for v in others:
                cells.append(f"{st[v]['median'] / st[subject]['median']:.2f}x"
                             if v in st and subject in st else "-")
            comp = r.get("compile_s")
            cells += [_rate(r, ceilings), f"{comp:.1f} s" if comp is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
            if r.get("peak_bytes"):
                pk = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in r["peak_bytes"].items())
                lines.append("| " + " | ".join(["", "peak memory", pk] + [""] * (len(head) - 3))
                             + " |")
        lines.append("")
    lines += ["## Triton kernels compiled ahead of time", ""]
    if aot and "error" not in aot[0]:
        keys = [k for k in aot[0] if k not in ("mma",)]
        lines += ["| " + " | ".join(keys) + " | MMA |", "|" + "---|" * (len(keys) + 1)]
        for a in aot:
            mma = ", ".join(a.get("mma") or []) or "-"
            lines.append("| " + " | ".join(str(a.get(k, "")) for k in keys) + f" | {mma} |")
    else:
        lines.append(f"Ahead-of-time compile unavailable: {aot[0].get('error') if aot else ''}")
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> list[Path]:
    """time-vs-size per kernel and speedup-per-case PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aecore.io import atomic_write

    rows = [b["extra_info"] for b in results.get("benchmarks", [])
            if b.get("extra_info", {}).get("stats")]
    paths = []
    out.mkdir(parents=True, exist_ok=True)
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        sized = [r for r in rows if r["kernel"] == kernel and r.get("size")]
        # Forward + backward where the kernel has it; forward-only kernels plot their forward.
        mode = "full" if any(r["mode"] == "full" for r in sized) else "forward"
        mine = [r for r in sized if r["mode"] == mode]
        if mine:
            fig, ax = plt.subplots(figsize=(6, 4))
            for series in dict.fromkeys(r.get("series") for r in mine):
                of_series = [r for r in mine if r.get("series") == series]
                for variant in dict.fromkeys(v for r in of_series for v in r["stats"]):
                    pts = sorted((r["size"], r["stats"][variant]["median"]) for r in of_series
                                 if variant in r["stats"])
                    ax.plot(*zip(*pts), marker="o",
                            label=variant if series is None else f"{variant}, {series}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("size (elements of work)")
            ax.set_ylabel("median time (s)")
            ax.set_title(f"{kernel}: {'forward + backward' if mode == 'full' else 'forward'}")
            ax.legend(fontsize=6)
            path = out / f"{kernel}_time.png"
            atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=100))
            plt.close(fig)
            paths.append(path)
    ratio_rows = [r for r in rows if {"aecore", "eager"} <= set(r["stats"])]
    if ratio_rows:
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(ratio_rows) + 1.5))
        labels = [f"{r['kernel']} {r['case']} {r['mode']}" for r in ratio_rows]
        speedups = [r["stats"]["eager"]["median"] / r["stats"]["aecore"]["median"]
                    for r in ratio_rows]
        ax.barh(labels, speedups, label="vs eager")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("speedup of aecore (median ratio, one interleaved run)")
        ax.tick_params(axis="y", labelsize=7)
        path = out / "speedup.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100,
                                                    bbox_inches="tight"))
        plt.close(fig)
        paths.append(path)
    return paths


def main(out: str | Path = "runs/bench", quick: bool = False, only: str | None = None) -> int:
    out = check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    ceilings = measure_ceilings(device, quick)
    results = run_suite(out, quick, only)
    aot = aot_table()
    elapsed = time.perf_counter() - t0
    write_json(out / "ceilings.json", ceilings)
    write_json(out / "aot.json", aot)
    write_bytes(out / "report.md", render(results, ceilings, aot, device, elapsed).encode())
    paths = plot(results, out / "plots")
    print(f"wrote {out / 'report.md'}, {len(paths)} plots in {out / 'plots'}, "
          f"{out / 'raw.json'}  [{elapsed:.0f} s]")
    return 0
