"""aecore.kernels.vq_nearest against a float64 brute-force oracle, on both backends."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tolerances import assert_close

from aecore.kernels.vq import aot_cases, vq_nearest, vq_nearest_reference

BACKENDS = ["torch", "triton"]
# (N, D, K): single row / single code, odd D spanning several 16-wide chunks, K spanning 33 code
# tiles of 16 (interpreter blocks), D = 64 (one-chunk path).
SHAPES = [(1, 3, 1), (37, 17, 5), (37, 3, 513), (1, 17, 513), (20, 64, 40)]


def _oracle(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force in float64 on the values the op sees (after rounding to their dtype)."""
    x64, c64 = x.double(), codebook.double()
    d = torch.cdist(x64, c64).pow(2)
    idx = d.argmin(dim=1)
    return idx, (x64 - c64[idx]).pow(2).sum(1)


def _check(x, codebook, backend):
    idx, dist = vq_nearest(x, codebook, backend=backend)
    ref_idx, ref_dist = _oracle(x, codebook)
    assert idx.dtype == torch.int64 and idx.shape == (x.shape[0],)
    assert torch.equal(idx, ref_idx)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert dist.dtype == out_dtype
    assert_close(dist, ref_dist, out_dtype, k=x.shape[1], scale=max(ref_dist.max().item(), 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_bruteforce_fp32(backend, shape):
    n, d, k = shape
    g = torch.Generator().manual_seed(n * 1000 + d * 10 + k)
    x = torch.randn(n, d, generator=g)
    codebook = torch.randn(k, d, generator=g)
    _check(x, codebook, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(37, 17, generator=g).to(dtype)
    codebook = torch.randn(40, 17, generator=g).to(dtype)
    _check(x, codebook, backend)


def test_float64_torch_backend():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 17, generator=g, dtype=torch.float64)
    codebook = torch.randn(5, 17, generator=g, dtype=torch.float64)
    _check(x, codebook, "torch")
    with pytest.raises(TypeError, match="float64"):
        vq_nearest(x, codebook, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(17, 74, generator=g)[:, ::2].t()  # (37, 17), strides (2, 74)
    codebook = torch.randn(17, 40, generator=g).t()  # (40, 17), transposed
    assert not x.is_contiguous() and not codebook.is_contiguous()
    _check(x, codebook, backend)
    idx, dist = vq_nearest(x.contiguous(), codebook.contiguous(), backend=backend)
    idx_nc, dist_nc = vq_nearest(x, codebook, backend=backend)
    assert torch.equal(idx, idx_nc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lowest_index(backend):
    # Small integers: every score and distance below is exact, so the ties are real ties.
    d = 5
    codebook = torch.full((40, d), 50.0)
    codebook[3] = 1.0       # duplicated at 35: a tie across code tiles (16 wide when interpreting)
    codebook[35] = 1.0
    codebook[20] = -1.0     # x = 0 is equidistant from 1 and -1: 3 beats 20
    codebook[21] = 2.0
    x = torch.tensor([[1.0] * d, [0.0] * d, [2.0] * d, [-1.0] * d, [49.0] * d])
    idx, dist = vq_nearest(x, codebook, backend=backend)
    assert idx.tolist() == [3, 3, 21, 20, 0]
    assert dist.tolist() == [0.0, float(d), 0.0, 0.0, float(d)]
    assert torch.equal(idx, torch.cdist(x.double(), codebook.double()).argmin(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_codes_are_never_nearest(backend, bad):
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(7, 3, generator=g), torch.randn(6, 3, generator=g)
    codebook[[1, 4], 0] = bad
    codebook[4, 2] = bad
    finite = [0, 2, 3, 5]
    expected = torch.tensor(finite)[torch.cdist(x.double(), codebook[finite].double()).argmin(1)]
    idx, dist = vq_nearest(x, codebook, backend=backend)
    assert torch.equal(idx, expected)
    assert_close(dist, (x - codebook[expected]).pow(2).sum(1), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e17, 1e-17])
def test_float32_range_edges(backend, scale):
    # The documented float32 range: squares of entries near 1e17 and 1e-17 stay finite and
    # normal, so the picks are the oracle's.
    g = torch.Generator().manual_seed(3)
    x, codebook = scale * torch.randn(37, 17, generator=g), scale * torch.randn(40, 17, generator=g)
    _check(x, codebook, backend)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_float64_beyond_the_float32_range(scale):
    g = torch.Generator().manual_seed(4)
    x = scale * torch.randn(37, 17, generator=g, dtype=torch.float64)
    codebook = scale * torch.randn(40, 17, generator=g, dtype=torch.float64)
    # Float64 is the way for data beyond float32's range (the module docstring).
    _check(x, codebook, "torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_row_gets_a_non_finite_distance(backend, bad):
    g = torch.Generator().manual_seed(1)
    x, codebook = torch.randn(5, 3, generator=g), torch.randn(6, 3, generator=g)
    x[2, 1] = bad
    idx, dist = vq_nearest(x, codebook, backend=backend)
    rest = [0, 1, 3, 4]
    assert not torch.isfinite(dist[2])
    if math.isnan(bad):
        assert idx[2] == 0
    assert torch.equal(idx[rest], torch.cdist(x[rest].double(), codebook.double()).argmin(1))
    assert torch.isfinite(dist[rest]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [16, 33])
def test_nan_scores_against_full_tiles_of_codes(backend, k):
    # A NaN row scores NaN against every code, and an inf code inf - inf against a row: with no
    # padded column in a tile to fall back on, argmin met NaN (the interpreter raised on an
    # all-NaN tile; a GPU's argmin is not NaN-safe and could disagree with min). NaN scores
    # count as +inf now.
    g = torch.Generator().manual_seed(2)
    x, codebook = torch.randn(4, 2, generator=g), torch.randn(k, 2, generator=g)
    x[0, 0] = float("nan")
    codebook[3] = float("inf")
    idx, dist = vq_nearest(x, codebook, backend=backend)
    assert idx[0] == 0 and torch.isnan(dist[0])
    finite = [i for i in range(k) if i != 3]
    want = torch.tensor(finite)[torch.cdist(x[1:].double(), codebook[finite].double()).argmin(1)]
    assert torch.equal(idx[1:], want)


def test_autocast_leaves_the_scores_in_float32():
    # The torch path's score GEMM ran in bf16 under autocast (9 of 1000 rows got a code that
    # is not the nearest); the Triton path never did.
    g = torch.Generator().manual_seed(5)
    x, codebook = torch.randn(1000, 16, generator=g), torch.randn(512, 16, generator=g)
    want = vq_nearest(x, codebook, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vq_nearest(x, codebook, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_no_grad(backend):
    codebook = torch.randn(5, 3, requires_grad=True)
    idx, dist = vq_nearest(torch.zeros(0, 3), codebook, backend=backend)
    assert idx.shape == (0,) and dist.shape == (0,)
    x = torch.randn(4, 3, requires_grad=True)
    idx, dist = vq_nearest(x, codebook, backend=backend)
    assert not dist.requires_grad and not idx.requires_grad


def test_reference_is_the_torch_backend():
    g = torch.Generator().manual_seed(5)
    x, codebook = torch.randn(37, 17, generator=g), torch.randn(5, 17, generator=g)
    a = vq_nearest_reference(x, codebook)
    b = vq_nearest(x, codebook, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    ("x", "codebook", "exc", "match"),
    [
        ([[0.0]], torch.zeros(2, 1), TypeError, "x must be a torch.Tensor, got list"),
        (torch.zeros(2, 1), "c", TypeError, "codebook must be a torch.Tensor, got str"),
        (torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1), TypeError,
         r"x must be a floating-point tensor .* got torch.int64"),
        (torch.zeros(3), torch.zeros(2, 3), ValueError,
         r"x must be 2-D \(N, D\), got shape \(3,\)"),
        (torch.zeros(2, 3), torch.zeros(2, 3, 1), ValueError,
         r"codebook must be 2-D \(K, D\), got shape \(2, 3, 1\)"),
        (torch.zeros(2, 3), torch.zeros(2, 4), ValueError,
         r"codebook.shape\[1\] must equal x.shape\[1\] \(D = 3\), got codebook of shape \(2, 4\)"),
        (torch.zeros(2, 3), torch.zeros(0, 3), ValueError, r"codebook must hold at least one code"),
        (torch.zeros(2, 0), torch.zeros(2, 0), ValueError, r"x must have at least one feature"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16), TypeError,
         "codebook must have x's dtype torch.float32, got torch.float16"),
        (torch.zeros(2, 3), torch.zeros(2, 3, device="meta"), ValueError,
         "codebook must be on x's device cpu, got meta"),
    ],
)
def test_bad_inputs(x, codebook, exc, match):
    with pytest.raises(exc, match=match):
        vq_nearest(x, codebook)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        vq_nearest(torch.zeros(2, 3), torch.zeros(2, 3), backend="cuda")


@pytest.mark.parametrize("use_triton", [False, True])
def test_custom_op_opcheck(use_triton):
    g = torch.Generator().manual_seed(2)
    x, codebook = torch.randn(19, 17, generator=g), torch.randn(21, 17, generator=g)
    torch.library.opcheck(torch.ops.aecore.vq_nearest.default, (x, codebook, use_triton),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_sees_one_op(backend):
    g = torch.Generator().manual_seed(4)
    x, codebook = torch.randn(19, 17, generator=g), torch.randn(21, 17, generator=g)
    fn = torch.compile(lambda a, b: vq_nearest(a, b, backend=backend), backend="aot_eager",
                       fullgraph=True)
    idx, dist = fn(x, codebook)
    ref_idx, ref_dist = vq_nearest(x, codebook, backend=backend)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


def test_export_emits_reference_math():
    class Quantiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.codebook = torch.nn.Parameter(torch.randn(21, 17))

        def forward(self, x):
            return vq_nearest(x, self.codebook, backend="triton")

    module = Quantiser()
    x = torch.randn(19, 17)
    prog = torch.export.export(module, (x,))
    targets = {str(n.target) for n in prog.graph.nodes if n.op == "call_function"}
    assert not any("aecore" in t for t in targets), targets
    assert any("argmin" in t for t in targets), targets
    idx, _ = prog.module()(x)
    assert torch.equal(idx, _oracle(x, module.codebook.detach())[0])


def test_aot_cases_cover_every_kernel_argument():
    cases = aot_cases()
    assert {c["dtype"] for c in cases} == {"fp32", "fp16", "bf16"}
    for case in cases:
        names = case["fn"].arg_names
        assert set(names) == set(case["signature"]) | set(case["constexprs"])
        assert set(case["divisible"]) <= set(case["signature"])


_COMPILE = """
import json
from aecore.kernels import aot
from aecore.kernels.vq import aot_cases
rows = []
for c in aot_cases():
    r = aot.compile_kernel(c["fn"], c["signature"], c["constexprs"], 80, c["num_warps"],
                           c["num_stages"], c["divisible"])
    rows.append({"name": c["name"], "gemm": c["gemm"], **r})
print(json.dumps(rows))
"""


def test_aot_cases_compile_for_sm80_without_spills():
    # What the interpreter can't show: the GPU configurations compile, fit in registers, and
    # fp16/bf16 code tiles run on tensor cores. Compiling needs TRITON_INTERPRET unset.
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert len(rows) == len(aot_cases())
    for r in rows:
        assert r["spills"] == 0, r
        assert bool(r["mma"]) == r["gemm"], r
