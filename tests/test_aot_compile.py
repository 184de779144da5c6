"""Ahead-of-time compile of every shipped Triton config for sm_80 and sm_90, on the CPU.

The compile needs TRITON_INTERPRET unset, so it runs in a subprocess (``python -m
aecore.kernels.aot``); this checks what the interpreter can't: no register spills, and
tensor-core MMA instructions in the SASS of the fp16/bf16/TF32 GEMMs (bf16 GEMM correctness
is judged here, the interpreter gets bf16 wrong).
"""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from aecore.kernels import aot

# By module path: the package may re-export the function under the same name.
fl = importlib.import_module("aecore.kernels.fused_linear")

pytest.importorskip("triton.backends.nvidia.compiler")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "aecore.kernels.aot"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_case_compiles_for_both_architectures(rows):
    expected = {(c["op"], c["name"], cc) for c in aot.collect_cases() for cc in (80, 90)}
    assert {(r["op"], r["name"], r["cc"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert r["registers"] > 0 and r["shared"] >= 0, r


def _tag(cfg) -> tuple:
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"],
            cfg.num_warps, cfg.num_stages)


@pytest.mark.parametrize("dtype,precision,vname", [
    (torch.float32, "ieee", "fp32"), (torch.float32, "tf32", "tf32"),
    (torch.float16, "ieee", "fp16"), (torch.bfloat16, "ieee", "bf16"),
])
def test_cases_cover_what_the_autotuner_can_pick(dtype, precision, vname):
    # The configs the autotuner keeps for this dtype/precision (its own prune function) must be
    # exactly the ones compiled, for the forward and both backward GEMM layouts.
    picked = fl._prune(fl.GPU_CONFIGS, {"x_ptr": torch.empty(0, dtype=dtype)},
                       PRECISION=precision)
    assert picked and len(picked) < len(fl.GPU_CONFIGS)
    want = {_tag(c) for c in picked}
    for kernel in ("fwd", "bwd_dx", "bwd_dw"):
        got = {
            (c["constexprs"]["BLOCK_M"], c["constexprs"]["BLOCK_N"], c["constexprs"]["BLOCK_K"],
             c["num_warps"], c["num_stages"])
            for c in fl.aot_cases()
            if c["name"].startswith(f"fused_linear_{kernel}_{vname}_")
        }
        assert got == want, kernel


def test_no_register_spills(rows):
    spilled = [(r["name"], r["cc"], r["spills"]) for r in rows if r["spills"]]
    assert not spilled


def test_tensor_core_gemms_use_mma_instructions(rows):
    gemms = [r for r in rows if r["gemm"]]
    assert {r["dtype"] for r in gemms} == {"fp16", "bf16", "tf32"}
    for r in gemms:
        prefixes = ("HMMA",) if r["cc"] == 80 else ("HGMMA", "HMMA")
        assert any(m.startswith(prefixes) for m in r["mma"]), (r["name"], r["cc"], r["mma"])
        if r["dtype"] == "bf16":
            assert any("BF16" in m for m in r["mma"]), (r["name"], r["mma"])
        if r["dtype"] == "tf32":
            assert any("TF32" in m for m in r["mma"]), (r["name"], r["mma"])


def test_ieee_fp32_stays_off_tensor_cores(rows):
    # allow_tf32=False must mean IEEE fp32: FMA units, no (TF32) MMA in the SASS.
    ieee = [r for r in rows if r["dtype"] == "fp32"]
    assert ieee
    assert all(not r["mma"] for r in ieee), [(r["name"], r["mma"]) for r in ieee if r["mma"]]


def test_collect_cases_skips_modules_without_cases():
    cases = aot.collect_cases(("aecore.kernels._backend", "aecore.kernels.fused_linear"))
    assert cases and {c["op"] for c in cases} == {"fused_linear"}
    assert "aecore.kernels.fused_linear" in aot.OPS


def test_compile_kernel_refuses_the_interpreter():
    case = fl.aot_cases()[0]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        aot.compile_kernel(case["fn"], case["signature"], case["constexprs"], 80)
