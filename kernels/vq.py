"""Nearest-code search for vector quantisation: for x (N, D) and a codebook (K, D),

    index[n]    = argmin_k ||x[n] - codebook[k]||^2
    distance[n] = ||x[n] - codebook[index[n]]||^2

The Triton kernel fuses the search: each program owns BLOCK_N rows of x and sweeps the codebook
in BLOCK_K tiles, scoring every code as ``||c||^2 - 2 x.c`` (the dot products by ``tl.dot``;
``||x||^2`` is the same for every code of a row, so it takes no part in the comparison) and
keeping a running (min, argmin) per row. The N x K distance matrix never exists in memory: the
kernel reads x and the codebook and writes 2 N values.

Ties go to the lowest index, as ``torch.argmin``: inside a tile ``tl.argmin`` keeps the leftmost
minimum, and a later tile replaces the running best only when strictly smaller. Ties are decided
on the computed scores, so codes whose exact distances differ by less than the rounding error of
the expanded form (about ``eps * (||x||^2 + ||c||^2)``) may resolve either way; both backends
compute the same scores in the same precision, but not in the same order of summation. Rows
holding NaN get an unspecified index; a code holding inf or NaN is never chosen for a finite
row while a finite code exists.

The returned distance is recomputed directly as ``sum((x - c)^2)`` for the chosen code, so it
has no cancellation error (the expanded form loses everything below eps * ||x||^2).

Range: the scores are squares and products of entries, so in float32 (fp32 and bf16 inputs)
entries must stay within about 1e-18 < |v| < 1e18 where they matter: beyond, ``||c||^2`` or
``x.c`` overflows (a finite code then scores +inf, like a non-finite one, and is never chosen)
or underflows to 0 (close codes tie and the lowest index wins). Scale such data, or pass
float64 (torch backend).

Precision: fp32 and fp16 load as they are, bf16 is upcast to fp32 on load (the interpreter gets
bf16 arithmetic wrong); products accumulate in fp32 with IEEE fp32 dot products (TF32 would
perturb close assignments). Distances are float32 for fp16/bf16/fp32 inputs (squared fp16
distances overflow easily) and float64 for float64 (torch backend only). Indices are int64.

Not differentiable: the straight-through estimator belongs to the model (:mod:`aecore.vqvae`).
Under torch.export / ONNX export the op emits :func:`vq_nearest_reference` (MatMul, ArgMin,
Gather); the Triton backend and anything under torch.compile run through the opaque custom op
``aecore::vq_nearest``; the torch backend in eager mode calls the reference directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aecore.kernels._backend import autocasting, exporting, interpreting, resolve

__all__ = ["vq_nearest", "vq_nearest_reference", "aot_cases"]


# --- Triton kernel -------------------------------------------------------------------------------

@triton.jit
def _vq_nearest_fwd_kernel(
    x_ptr, c_ptr, idx_ptr, dist_ptr, N, K, D,
    stride_xn, stride_xd, stride_ck, stride_cd,
    SINGLE_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Nearest code of BLOCK_N rows of x (N, D) in c (K, D), both strided; idx (N,) int64 and
    dist (N,) contiguous. SINGLE_D: D <= BLOCK_D, so the x tile is loaded once for all codes."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = rn < N
    x_rows = x_ptr + rn.to(tl.int64)[:, None] * stride_xn
    rd = tl.arange(0, BLOCK_D)
    rk = tl.arange(0, BLOCK_K)

    # With SINGLE_D the whole row fits one tile: it stays in registers across the codebook sweep.
    x0 = tl.load(x_rows + rd.to(tl.int64)[None, :] * stride_xd,
                 mask=in_n[:, None] & (rd < D)[None, :], other=0.0)
    if UPCAST:
        x0 = x0.to(tl.float32)

    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        in_k = kk < K
        c_cols = c_ptr + kk.to(tl.int64)[None, :] * stride_ck
        dot = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        csq = tl.zeros((BLOCK_K,), tl.float32)
        if SINGLE_D:
            ct = tl.load(c_cols + rd.to(tl.int64)[:, None] * stride_cd,
                         mask=(rd < D)[:, None] & in_k[None, :], other=0.0)
            if UPCAST:
                ct = ct.to(tl.float32)
            cf = ct.to(tl.float32)
            csq = tl.sum(cf * cf, axis=0)
            dot = tl.dot(x0, ct, dot, input_precision=PRECISION)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + rd
                in_d = dd < D
                a = tl.load(x_rows + dd.to(tl.int64)[None, :] * stride_xd,
                            mask=in_n[:, None] & in_d[None, :], other=0.0)
                ct = tl.load(c_cols + dd.to(tl.int64)[:, None] * stride_cd,
                             mask=in_d[:, None] & in_k[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    ct = ct.to(tl.float32)
                cf = ct.to(tl.float32)
                csq += tl.sum(cf * cf, axis=0)
                dot = tl.dot(a, ct, dot, input_precision=PRECISION)
        score = csq[None, :] - 2.0 * dot
        # NaN scores (a code with inf entries: inf - inf; a row holding NaN) count as +inf:
        # tl.argmin is not NaN-safe, and it must agree with tl.min on the chosen code.
        score = tl.where(in_k[None, :] & (score == score), score, float("inf"))
        tile_min = tl.min(score, axis=1)
        tile_arg = tl.argmin(score, axis=1, tie_break_left=True) + k0
        # Strictly smaller only: an equal score in a later tile has a higher index.
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_arg, best_idx)

    # The exact distance to the chosen code: one gathered row per x row, no cancellation.
    c_best = c_ptr + best_idx.to(tl.int64)[:, None] * stride_ck
    dist = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + rd
        m = in_n[:, None] & (dd < D)[None, :]
        a = tl.load(x_rows + dd.to(tl.int64)[None, :] * stride_xd, mask=m, other=0.0)
        c = tl.load(c_best + dd.to(tl.int64)[None, :] * stride_cd, mask=m, other=0.0)
        diff = a.to(tl.float32) - c.to(tl.float32)
        dist += tl.sum(diff * diff, axis=1)
    tl.store(idx_ptr + rn, best_idx.to(tl.int64), mask=in_n)
    tl.store(dist_ptr + rn, dist, mask=in_n)


# --- torch reference -----------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Only convert when needed: an exported graph then has no no-op casts in it.
    return t if t.dtype == dtype else t.to(dtype)


def vq_nearest_reference(x: torch.Tensor, codebook: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int64 (N,), squared distances (N,)) for x (N, D), codebook (K, D), in plain
    torch: scores ``||c||^2 - 2 x @ c.T`` (N, K), ``argmin`` (lowest index on ties), then
    the distance to the chosen code. fp16/bf16 compute in fp32; distances float32
    (float64 for float64)."""
    cd = _compute_dtype(x.dtype)
    xc, cc = _as(x, cd), _as(codebook, cd)
    norm = (cc * cc).sum(1)
    # A code with an inf or NaN entry is infinitely far from every finite x, but its score
    # would be inf - inf = NaN, which argmin takes for the minimum: score such codes +inf
    # (zero rows in the product, +inf norms), as the kernel's min does.
    bad = ~torch.isfinite(norm)
    norm = norm.masked_fill(bad, float("inf"))
    # One GEMM with the ||c||^2 row folded in (addmm's bias): no extra passes over (N, K).
    score = torch.addmm(norm, xc, cc.masked_fill(bad[:, None], 0.0).t(), alpha=-2.0)
    idx = score.argmin(dim=1)
    dist = (xc - cc[idx]).pow(2).sum(1)
    return idx, dist


# --- Triton launcher -----------------------------------------------------------------------------

def _gpu_blocks(D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_D, num_warps) on a GPU. tl.dot needs every tile dim >= 16."""
    if dtype == torch.float32:
        # IEEE fp32 runs on FMA units with both operand tiles in registers: a 64-wide D tile
        # spilled (seen: 220 bytes on sm_80), 16 wide does not.
        return 64, 64, 16, 4
    # fp16/bf16 on tensor cores: up to 128 features in one tile, held across the codebook sweep.
    return 64, 64, min(max(triton.next_power_of_2(D), 16), 128), 4


def _blocks(D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if interpreting():
        # Small tiles so odd test shapes span several row blocks, code tiles and D chunks.
        return 16, 16, 16, 4
    return _gpu_blocks(D, dtype)


def _triton_forward(x: torch.Tensor, codebook: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    N, D = x.shape
    K = codebook.shape[0]
    idx = torch.empty((N,), device=x.device, dtype=torch.int64)
    dist = torch.empty((N,), device=x.device, dtype=torch.float32)
    if N == 0:
        return idx, dist
    block_n, block_k, block_d, warps = _blocks(D, x.dtype)
    _vq_nearest_fwd_kernel[(triton.cdiv(N, block_n),)](
        x, codebook, idx, dist, N, K, D,
        x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
        SINGLE_D=D <= block_d, PRECISION="ieee",
        UPCAST=x.dtype == torch.bfloat16 and interpreting(),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps,
    )
    return idx, dist


# --- custom op -----------------------------------------------------------------------------------

@torch.library.custom_op("aecore::vq_nearest", mutates_args=())
def _vq_nearest_op(x: torch.Tensor, codebook: torch.Tensor, use_triton: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int64 (N,), distances (N,)) for x (N, D), codebook (K, D)."""
    if use_triton:
        return _triton_forward(x, codebook)
    return vq_nearest_reference(x, codebook)


@_vq_nearest_op.register_fake
def _(x, codebook, use_triton):
    n = x.shape[0]
    return (x.new_empty((n,), dtype=torch.int64),
            x.new_empty((n,), dtype=_compute_dtype(x.dtype)))


# --- public function -----------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _validate(x: object, codebook: object) -> None:
    for name, t, shape in (("x", x, "(N, D)"), ("codebook", codebook, "(K, D)")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 "
                            f"or float64), got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D {shape}, got shape {tuple(t.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code (K >= 1), got shape "
                         f"{tuple(codebook.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one feature (D >= 1), got shape {tuple(x.shape)}")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"codebook.shape[1] must equal x.shape[1] (D = {x.shape[1]}), got "
                         f"codebook of shape {tuple(codebook.shape)}")
    if codebook.dtype != x.dtype:
        raise TypeError(f"codebook must have x's dtype {x.dtype}, got {codebook.dtype}")
    if codebook.device != x.device:
        raise ValueError(f"codebook must be on x's device {x.device}, got {codebook.device}")


def vq_nearest(x: torch.Tensor, codebook: torch.Tensor, *, backend: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of each row: x (N, D), codebook (K, D) -> (indices int64 (N,),
    squared distances (N,)).

    Ties go to the lowest index (as ``torch.argmin``). A row holding NaN or Inf has no nearest
    code: its index means nothing (0 for NaN) and its distance is NaN or Inf. Distances are
    float32 for fp16/bf16/fp32 and float64 for float64; in float32 entries must keep their
    squares in range (about 1e-18 < |v| < 1e18, see the module docstring). Not differentiable
    (inputs are detached). ``backend``: "auto" | "triton" | "torch" (see
    ``aecore.kernels._backend.resolve``); float64 runs on torch.
    """
    _validate(x, codebook)
    if autocasting(x) is not None:
        # The scores' GEMM accumulates in fp32: autocast would run the torch path's in bf16.
        with torch.autocast(x.device.type, enabled=False):
            return vq_nearest(x, codebook, backend=backend)
    use_triton = resolve(backend, x, codebook) == "triton"
    x, codebook = x.detach(), codebook.detach()
    if exporting():
        # Plain ops, so that ONNX gets MatMul + ArgMin + Gather.
        return vq_nearest_reference(x, codebook)
    if use_triton or torch.compiler.is_compiling():
        # One opaque node for torch.compile, whichever backend runs inside.
        return torch.ops.aecore.vq_nearest(x, codebook, use_triton)
    return vq_nearest_reference(x, codebook)


# --- ahead-of-time compile cases ------------------------------------------------------------------

_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_cases() -> list[dict]:
    """The GPU launches with contiguous tensors, for ``aecore.kernels.aot``: per dtype, D = 64
    (for fp16/bf16 one D tile, x held across the sweep) and D = 256 (D in chunks)."""
    cases = []
    args = ("x_ptr", "c_ptr", "idx_ptr", "dist_ptr", "N", "K", "D", "stride_xn", "stride_ck")
    for dtype, vname in _TL_NAME.items():
        ptr = f"*{vname}"
        sig = {a: ptr if a in ("x_ptr", "c_ptr") else "i32" for a in args}
        sig["idx_ptr"], sig["dist_ptr"] = "*i64", "*fp32"
        for d in (64, 256):
            block_n, block_k, block_d, warps = _gpu_blocks(d, dtype)
            single = d <= block_d
            cases.append({
                "name": f"vq_nearest_d{d}_{vname}",
                "fn": _vq_nearest_fwd_kernel,
                "signature": sig,
                "constexprs": {"stride_xd": 1, "stride_cd": 1, "SINGLE_D": single,
                               "PRECISION": "ieee", "UPCAST": False, "BLOCK_N": block_n,
                               "BLOCK_K": block_k, "BLOCK_D": block_d},
                "divisible": list(args),
                "num_warps": warps, "num_stages": 1,
                # fp32 runs IEEE (FMA units): tensor-core MMA only for fp16/bf16.
                "gemm": dtype != torch.float32, "dtype": vname,
            })
    return cases
