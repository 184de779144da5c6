"""Ahead-of-time compile of the ops' Triton kernels for real GPUs, on any machine (no GPU needed).

Every op module listed in ``OPS`` that defines ``aot_cases()`` contributes its cases: dicts with
``name``, ``fn`` (the @triton.jit kernel, autotuned or not), ``signature`` (argument name ->
Triton type such as ``"*fp16"``, ``"i32"``, ``"fp32"``), ``constexprs`` (name -> value),
``divisible`` (argument names known to be multiples of 16: enables vectorised loads and software
pipelining), ``num_warps``, ``num_stages``, and optionally ``dtype`` and ``gemm`` (True where
tensor-core MMA instructions are expected for fp16/bf16).

    python -m aecore.kernels.aot [--cc 80 90] [--jobs N] [--only SUBSTRING]

prints a JSON list, one row per (case, compute capability): registers, spill bytes, shared
memory and the MMA instructions found in the SASS. It needs ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from aecore.kernels._backend import interpreting

# The op modules whose kernels are compiled; adding an op is one line here.
OPS = (
    "aecore.kernels.contractive",
    "aecore.kernels.fused_linear",
    "aecore.kernels.reparameterize",
    "aecore.kernels.sparsity",
    "aecore.kernels.vq",
)

CCS = (80, 90)

# A SASS instruction line: "/*0a30*/  @!P0 HMMA.16816.F32 R4, R8, R12, R4 ;". The opcode follows
# the address and an optional predicate; tensor-core opcodes contain MMA (HMMA, HGMMA, IMMA ...).
_SASS_MMA = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_]*MMA[A-Za-z0-9_.]*)")
_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def collect_cases(ops: tuple[str, ...] = OPS) -> list[dict]:
    """All cases of ``ops``, each tagged with its module as ``op``; modules without
    ``aot_cases`` are skipped."""
    cases = []
    for mod_name in ops:
        mod = importlib.import_module(mod_name)
        get = getattr(mod, "aot_cases", None)
        if get is None:
            continue
        for case in get():
            cases.append({"op": mod_name.rsplit(".", 1)[-1], **case})
    return cases


def _jit_function(fn):
    from triton.runtime.jit import JITFunction

    # Autotuners (and heuristics) wrap the JITFunction; the compiler wants the function itself.
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise TypeError(f"fn must be a @triton.jit function, got {type(fn).__name__}")
        fn = fn.fn
    return fn


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_kernel(fn, signature: dict[str, str], constexprs: dict[str, object], cc: int,
                   num_warps: int = 4, num_stages: int = 3,
                   divisible: tuple[str, ...] | list[str] = ()) -> dict:
    """Compile ``fn`` for sm_``cc`` (80 or 90) and return
    ``{"registers", "spills" (bytes stored + loaded), "shared" (bytes), "mma" (SASS opcodes)}``.

    ``signature`` types the runtime arguments; every other argument must be in ``constexprs``.
    """
    if interpreting():
        raise RuntimeError("compile_kernel needs TRITON_INTERPRET unset (the interpreter "
                           "replaces @triton.jit functions); run it in a separate process")
    if cc not in CCS:
        raise ValueError(f"cc must be one of {CCS}, got {cc!r}")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    jit = _jit_function(fn)
    missing = [a for a in jit.arg_names if a not in signature and a not in constexprs]
    if missing:
        raise ValueError(f"signature or constexprs must give every argument of "
                         f"{jit.__name__}; missing {missing}")
    sig = {a: "constexpr" if a in constexprs else signature[a] for a in jit.arg_names}
    attrs = {(jit.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=jit, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    arch = sm_arch_from_capability(cc)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        # The flags Triton itself passes, so that the counts are those of the shipped cubin.
        log = subprocess.run([get_ptxas(cc).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={arch}", str(ptx), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    regs = _REGS.search(log)
    spills = _SPILLS.search(log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output for {jit.__name__}: {log[-500:]}")
    return {
        "registers": int(regs.group(1)),
        "spills": int(spills.group(1)) + int(spills.group(2)),
        "shared": int(kernel.metadata.shared),
        "mma": sorted(set(_SASS_MMA.findall(sass))),
    }


_CASES: list[dict] = []


def _compile_case(job: tuple[int, int]) -> dict:
    index, cc = job
    case = _CASES[index]
    out = compile_kernel(case["fn"], case["signature"], case["constexprs"], cc,
                         case["num_warps"], case["num_stages"], case.get("divisible", ()))
    return {"op": case["op"], "name": case["name"], "cc": cc, "dtype": case.get("dtype", ""),
            "gemm": bool(case.get("gemm", False)), "warps": case["num_warps"],
            "stages": case["num_stages"], **out}


def compile_all(ops: tuple[str, ...] = OPS, ccs: tuple[int, ...] = CCS, jobs: int | None = None,
                only: str | None = None) -> list[dict]:
    """Compile every case of ``ops`` for every cc in ``ccs``, ``jobs`` processes at a time;
    rows in case order, then cc order."""
    _CASES[:] = [c for c in collect_cases(ops) if only is None or only in c["name"]]
    work = [(i, cc) for i in range(len(_CASES)) for cc in ccs]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    if jobs == 1:
        return [_compile_case(w) for w in work]
    # fork: workers inherit the imported modules and the case list (kernel objects don't pickle).
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_case, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aecore.kernels.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cc", type=int, nargs="+", default=list(CCS), choices=CCS)
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: cores)")
    parser.add_argument("--only", default=None, help="compile only cases whose name contains this")
    args = parser.parse_args(argv)
    if interpreting():
        print("aecore.kernels.aot needs TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    rows = compile_all(ccs=tuple(args.cc), jobs=args.jobs, only=args.only)
    json.dump(rows, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
