"""Contractive penalty (gradients for every weight and bias in the backward): aecore's op vs
the penalty from torch.func.vmap(torch.func.jacrev(encoder)) and torch.compile of that, at
d = 784, in forward, backward and full modes at B = 256, and in full mode over a batch sweep.
Time and peak-memory ratios come from one interleaved run (never asserted); peak memory is
bench/harness.py's ``peak_bytes`` (inputs and parameters are common to all variants and not
counted). In full mode each case also counts the FLOPs of one forward + backward of aecore and
of vmap(jacrev) with torch.profiler (``with_flops``: every matrix product, inside the custom op
too): their ratio is the speed-up an exact method at equal efficiency would show.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from aecore.kernels._activations import act_torch
from aecore.kernels.contractive import contractive_penalty, plan
from bench.harness import MODES, compiled, device, in_mode, quick, run_case

BATCH = 256
SWEEP = [64, 256, 1024]
# (name, dims, activations): one wide layer, the usual MNIST encoder, a shallow one.
CASES = [
    ("784-1024", [784, 1024], ["sigmoid"]),
    ("784-512-128-32", [784, 512, 128, 32], ["relu", "relu", "identity"]),
    ("784-256-64", [784, 256, 64], ["relu", "identity"]),
]
# The one-layer Jacobian is (256, 1024, 784): vmap(jacrev) takes ~20 s a call on 2 CPU cores
# (and 5 GB), so that case runs in full mode at B = 256 only.
RUNS = [(name, dims, acts, mode, BATCH) for name, dims, acts in CASES for mode in MODES
        if name != "784-1024" or mode == "full"]
RUNS += [(name, dims, acts, "full", b) for name, dims, acts in CASES[1:] for b in SWEEP
         if b != BATCH]


def _params(dims, batch, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    ws = [(torch.randn(o, i, device=dev, generator=g) / i**0.5).requires_grad_()
          for i, o in zip(dims, dims[1:])]
    bs = [(0.1 * torch.randn(o, device=dev, generator=g)).requires_grad_() for o in dims[1:]]
    x = torch.rand(batch, dims[0], device=dev, generator=g)
    return x, ws, bs


def _jacrev_penalty(x, ws, bs, acts):
    def f(v):
        for w, b, act in zip(ws, bs, acts):
            v = act_torch(F.linear(v, w, b), act)
        return v
    return torch.func.vmap(torch.func.jacrev(f))(x).pow(2).sum(dim=(1, 2))


def counted_flops(fn) -> float:
    """FLOPs of one call of ``fn`` as torch.profiler counts them (matrix products and
    elementwise multiplies and adds, the ATen ops it has formulas for)."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    return float(sum(e.flops for e in prof.key_averages()))


@pytest.mark.parametrize("name,dims,acts,mode,batch", RUNS,
                         ids=[f"{r[0]}-{r[3]}-B{r[4]}" for r in RUNS])
def bench_contractive(benchmark, name, dims, acts, mode, batch):
    if quick() and (name != CASES[1][0] or batch != BATCH):
        pytest.skip("--quick runs the 784-512-128-32 case at B=256 only")
    dev = device()
    x, ws, bs = _params(dims, batch, dev)
    leaves = [*ws, *bs]

    def call(fn):
        return lambda: fn(x, ws, bs, acts).mean()

    calls = {"aecore": call(contractive_penalty), "jacrev": call(_jacrev_penalty)}
    slow = dev == "cpu" and len(dims) == 2
    smoke = getattr(benchmark, "disabled", False)
    compile_s, compile_error = None, None
    if smoke and slow:
        compile_error = "skipped in the one-round pass"
    else:
        try:
            comp, compile_s = compiled(("contractive", name, batch), _jacrev_penalty,
                                       lambda f: f(x, ws, bs, acts).mean().backward())
            calls["compile"] = call(comp)
        except Exception as exc:  # report, don't fail: torch.compile may not take vmap(jacrev)
            compile_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"[contractive] {name}: torch.compile of vmap(jacrev) failed: {compile_error}")
    fns = {k: in_mode(mode, c, leaves) for k, c in calls.items()}
    # The one-round smoke pass of the slow case skips the baselines' memory profiles (5 GB).
    info = run_case(benchmark, fns, rounds=3 if slow else 15, warmup=0 if slow else 2,
                    memory=not (smoke and slow), kernel="contractive",
                    case=f"B{batch}-{name}", series=name, mode=mode, size=batch * dims[0],
                    compile_s=compile_s)
    info["order"] = plan(batch, dims)
    if mode == "full":
        # vmap(jacrev)'s one-layer case costs ~20 s and 5 GB a call: count aecore's alone there.
        counted = ["aecore"] if slow else ["aecore", "jacrev"]
        flops = {k: counted_flops(fns[k]) for k in counted}
        info["counted_flops"] = flops
        info["flops"] = flops["aecore"]  # the work of aecore's call: the report's achieved rate
        if "jacrev" in flops:
            info["flop_ratio_vs_jacrev"] = flops["jacrev"] / flops["aecore"]
    info["compile_error"] = compile_error
    benchmark.extra_info.update(info)
    print(f"[contractive] {name} B{batch} {mode} ({info['order']}): "
          + "  ".join(f"{k}={v:.3f}" for k, v in info.items()
                      if k.startswith(("memory_ratio", "flop_ratio"))))
