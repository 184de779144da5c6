"""The benchmark report renders pytest-benchmark output into markdown tables and plots."""

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
