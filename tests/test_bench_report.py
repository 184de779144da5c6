"""The benchmark report renders pytest-benchmark output into markdown tables and plots."""

import subprocess
from pathlib import Path

import pytest
import torch

from aecore import bench_report
from aecore.bench_report import measure_ceilings, plot, render


def _row(kernel, case, size, stats, mode="full", **extra):
    return {"extra_info": {"kernel": kernel, "case": case, "mode": mode, "size": size,
                           "stats": {k: {"median": v, "min": v * 0.9, "max": v * 1.2}
                                     for k, v in stats.items()}, **extra}}


def test_report_tables_ratios_and_plots(tmp_path):
    results = {"benchmarks": [
        _row("fused_linear", "small", 1e3, {"aecore": 2e-3, "eager": 3e-3, "compile": 1e-3},
             flops=2e6, compile_s=4.0),
        _row("fused_linear", "large", 1e5, {"aecore": 2e-2, "eager": 2e-2, "compile": 1e-2},
             flops=2e8),
        _row("fused_linear", "small sigmoid", 1e3, {"aecore": 2e-3, "eager": 3e-3},
             series="sigmoid"),
        _row("contractive", "deep", 1e4, {"aecore": 1e-2, "jacrev": 5e-2},
             peak_bytes={"aecore": 2**20, "jacrev": 2**24}),
        _row("vq_nearest", "4096x512", 2e6, {"aecore": 1e-3, "eager": 2e-3}, mode="forward"),
    ]}
    ceilings = {"copy_bytes_per_s": 1e10, "matmul_fp32_flops": 1e10}
    aot = [{"op": "fused_linear", "kernel": "fwd", "cc": 80, "registers": 96, "spills": 0,
            "mma": ["HMMA.16816.F32"]}]
    text = render(results, ceilings, aot, "cpu", 12.0)
    assert "| small | full | 2.00 ms (1.80 ms-2.40 ms) | 3.00 ms" in text
    assert "| 1.50x | 0.50x |" in text  # eager 3 ms / aecore 2 ms; compile 1 ms / 2 ms
    assert "aecore vs jacrev" in text and "| 5.00x |" in text
    assert "1.0 GFLOP/s (10%)" in text  # 2e6 flops in 2 ms against a 1e10 ceiling
    assert "jacrev 16.0 MiB" in text and "HMMA.16816.F32" in text
    paths = plot(results, tmp_path)
    # Forward-only kernels get their time-vs-size plot from the forward rows.
    assert {p.name for p in paths} == {"fused_linear_time.png", "contractive_time.png",
                                       "vq_nearest_time.png", "speedup.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_ceilings_are_measured():
    c = measure_ceilings("cpu", quick=True)
    assert c["copy_bytes_per_s"] > 1e8 and c["matmul_fp32_flops"] > 1e8


def test_report_renders_cases_without_an_aecore_variant_and_zero_compile_time():
    results = {"benchmarks": [
        _row("int8_gemm", "256x784->512", None, {"gemm_int8": 1e-3, "gemm_fp32": 2e-3},
             mode="inference"),
        _row("onnx_runtime", "batch 1", 784, {"eager": 1e-4, "ort_fp32": 5e-5, "ort_int8": 4e-5},
             mode="inference, steady"),
        _row("vq_nearest", "small", 1e3, {"aecore": 1e-3, "eager": 2e-3}, mode="forward",
             compile_s=0.0),
    ]}
    text = render(results, {"copy_bytes_per_s": 1e10, "matmul_fp32_flops": 1e10}, [], "cpu", 1.0)
    # The first variant is the subject; ratio = median(other) / median(subject).
    assert "| gemm_int8 vs gemm_fp32 |" in text and "| 2.00x |" in text
    assert "| eager vs ort_fp32 | eager vs ort_int8 |" in text and "| 0.50x | 0.40x |" in text
    assert "| 0.0 s |" in text  # a measured 0 s compile is a time, not "-"


class _FakeBenchmark:
    disabled = True

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, fn, rounds, iterations):
        fn()


def _bench(name):
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    import importlib

    return importlib.import_module(f"bench.{name}")


def test_cpu_peak_bytes_counts_what_one_call_holds_at_once():
    harness = _bench("harness")

    def fn():
        a = torch.empty(250_000)  # 1 MB
        b = torch.empty(250_000)  # 1 MB: 2 MB held
        del a
        c = torch.empty(125_000)  # 0.5 MB: 1.5 MB held
        return b, c

    assert harness.peak_bytes(fn, "cpu") == 2_000_000


def test_vq_compile_time_includes_the_whole_compile():
    # The timed calls run under no_grad; torch.compile guards on grad mode, so a first call
    # with grad on would leave a second compile to the warmup, outside compile_s.
    from torch._dynamo.utils import counters

    vq = _bench("bench_vq")
    before = counters["stats"]["unique_graphs"]
    bench = _FakeBenchmark()
    vq.bench_vq_nearest(bench, (64, 16, 4))
    assert counters["stats"]["unique_graphs"] - before == 1
    assert bench.extra_info["compile_s"] > 0


def test_a_failed_run_keeps_the_earlier_results_and_never_reports_them(tmp_path, monkeypatch):
    # pytest exits 5 when -k selects no benchmark and writes no JSON: the file an earlier run
    # left stays (a typo in --only must not delete it) but must not come back as this run's.
    old = '{"benchmarks": [{"extra_info": {"kernel": "old"}}]}'
    (tmp_path / "raw.json").write_text(old)
    monkeypatch.setattr(bench_report.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 5))
    with pytest.raises(ValueError, match="no benchmark matched --only 'typo'"):
        bench_report.run_suite(tmp_path, True, "typo")
    monkeypatch.setattr(bench_report.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 1))
    with pytest.raises(RuntimeError, match="benchmark suite failed"):
        bench_report.run_suite(tmp_path, True, None)
    assert [p.name for p in tmp_path.iterdir()] == ["raw.json"]
    assert (tmp_path / "raw.json").read_text() == old

    def run(cmd, **kwargs):  # a run that succeeds writes its JSON where it is told
        path = next(a for a in cmd if a.startswith("--benchmark-json=")).split("=", 1)[1]
        Path(path).write_text('{"benchmarks": [{"extra_info": {"kernel": "new"}}]}')
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench_report.subprocess, "run", run)
    results = bench_report.run_suite(tmp_path, True, None)
    assert results["benchmarks"][0]["extra_info"]["kernel"] == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["raw.json"]
    assert "new" in (tmp_path / "raw.json").read_text()


def test_bench_out_must_be_a_folder(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="--out must be a folder path"):
        bench_report.main(tmp_path / "f" / "x")


def test_interleaved_rounds_give_every_variant_every_predecessor():
    # A variant runs slower right after one that touched more memory: within a round, each
    # variant must follow each other one in some rounds, not the same one every round.
    harness = _bench("harness")
    calls = []
    names = ["aecore", "eager", "compile"]
    stats = harness.interleaved({n: (lambda n=n: calls.append(n)) for n in names},
                                rounds=30, warmup=0)
    assert set(stats) == set(names)
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert all(sorted(r) == sorted(names) for r in rounds)
    followed = {(r[i - 1], r[i]) for r in rounds for i in (1, 2)}
    assert followed == {(a, b) for a in names for b in names if a != b}
