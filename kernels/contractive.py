"""Batched contractive penalty: per-sample ||J_f(x)||_F^2 of an MLP encoder, exact.

Encoder: a_0 = x (B, d); z_l = a_{l-1} W_l^T + b_l; a_l = act_l(z_l), l = 1..L, W_l (h_l, h_{l-1}),
h_0 = d. Its Jacobian per sample is J = D_L W_L ... D_1 W_1 with D_l = diag(s_l), s_l = act_l'(z_l),
and the penalty is P = ||J||_F^2 = trace(J J^T). The (B, h_L, d) Jacobian is never formed.

Evaluation orders (multiply-adds for forward + backward, B samples, r = h_L the code width;
the encoder's own GEMMs, B * sum_l h_l h_{l-1} each way, are common to all and left out):

- ``closed`` (L = 1): P_b = sum_j s_bj^2 ||W_j||^2. Cost 2 B h + 2 h d.
- ``gram`` (L >= 2): chain from the latent side, A = D_L W_L D_{L-1} ... W_2 D_1 (r, h_1) per
  sample, then P_b = sum_k w_k a_k^T G a_k with G = W_1 W_1^T (h_1, h_1) computed once per batch
  and shared by every sample, so the large d is contracted once, not per sample. Chain:
  4 B r sum_{l=2}^{L-1} h_l h_{l-1} (forward, its recomputation in the backward, dA, dW);
  quadratic form B r h_1^2 forward and f B r h_1^2 backward (dG = A^T diag(c) A, symmetric:
  only its upper block triangle, f = (n + 1) / 2n for n blocks of SYM_BLOCK, 5/8 at h_1 = 512;
  V = A G is kept from the forward, dA = c * V); G and dW_1 = 2 dG W_1: 2 h_1^2 d.
- ``direct`` (L >= 2): the same chain, then P_b = ||A W_1||_F^2 without the Gram matrix:
  B r h_1 d forward, 2 B r h_1 d backward (dA = dY W_1^T, dW_1 = A^T dY).

``gram`` wins when (1 + f) B r h_1^2 + 2 h_1^2 d < 3 B r h_1 d, roughly when d exceeds h_1;
both share the chain. (Chaining from the input side instead, forward mode, costs about
3 B d sum h_l h_{l-1}, cheaper than the latent side only when d < r, i.e. over-complete codes of
tiny inputs.)
:func:`plan` picks by this model.

Accuracy. ``direct`` sums squares, so its rounding error is relative to ||J||. ``gram`` forms
a^T G a, whose error is relative to || |W_1|^T |a| ||^2 instead, about eps * h_1 times it: where
W_1^T a cancels far below |W_1|^T |a| (by ~1e3 in float32), that row's term is lost in
rounding; it is clamped at 0, never negative. Such a row is a Jacobian of ~1e-6 of its scale;
float64 inputs (torch path) give it to full precision.

Memory. The forward keeps V (B r h_1 values; Y = A W_1, B r d, for ``direct``) and the (B, h_l)
activations, nothing else of size B r h: the backward recomputes the chain, which costs
r sum h_l h_{l-1} per sample, far less than recomputing V (r h_1^2). Chain products exist one
batch chunk at a time (:func:`_chunk`), so the transient memory is bounded, not O(B r h).

What runs where. The Triton path runs every batched product through one GEMM kernel with fused
epilogues (bias; a row scale; the per-sample column scale D_l that each chain step applies, with
the unscaled product stored beside it for the backward; a per-row dot product so the quadratic
form never writes A G when no gradient is needed), an activation kernel (act and act' in one
pass), a backward kernel for pre-activations (dz = ds act'' + da act', act'' being what the
penalty's gradient needs) and a grouped reduction (per-sample sums of products: ds_l, and the
batch sum that gives dW_L). Plain torch elementwise ops remain where a kernel would add nothing
over one memory pass: the broadcast product A_{L-1} = W_L * s_{L-1}, the backward's scalings
dA = 2 c * V and dC = dA * s_{l-1}, the closed form's (B, h) terms and a few (B, r) vectors. The
torch path runs the same algorithm with torch's matmuls over the whole chunk (float64
included).

The op ``aecore::contractive_penalty`` is a custom op with its own backward (the gradient is
not the autograd of the forward: it reuses the kept products and skips the ds_l terms of
activations whose second derivative is zero). Under export, torch.func transforms (vmap, jvp,
jacfwd) and forward-mode AD the public function runs :func:`contractive_penalty_reference`,
plain differentiable torch math. Inside torch.compile it can't see a transform: there vmap maps
the op over the batch (a rule that loops), while grad/jacrev over it stop at torch's custom-op
autograd, which functorch transforms don't take (differentiate the reference there). A batch of
cotangents (``is_grads_batched``) runs the reference's autograd. Double backward is not
supported by the op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from aecore.kernels._activations import (
    ACTIVATIONS,
    _tanh,
    act_grad,
    act_grad_torch,
    act_torch,
    activation_id,
    apply_act,
)
from aecore.kernels._backend import (
    autocast_cast,
    autocasting,
    check_like,
    check_slope,
    exporting,
    interpreting,
    resolve,
    transformed,
)

__all__ = ["contractive_penalty", "contractive_penalty_reference", "plan", "ORDERS"]

ORDERS = ("closed", "gram", "direct")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Activations whose second derivative is zero everywhere torch defines it: the penalty's
# gradient then has no ds_l term through that layer.
_LINEAR_PIECES = ("identity", "relu", "leaky_relu")
# Symmetric products (dG) are computed by block rows of this many columns, upper triangle only:
# 4 blocks of 128 for h_1 = 512 take 10 of 16 block products, 62.5% of the full GEMM.
SYM_BLOCK = 128


# --- Triton kernels ------------------------------------------------------------------------------

@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _act_grad2(z, ACT: tl.constexpr):
    """act''(z) for the id ``ACT``, fp32; zero for the piecewise-linear ones (torch's too)."""
    if ACT == 3:
        s = _sigmoid(z)
        g = s * (1.0 - s) * (1.0 - 2.0 * s)
    elif ACT == 4:
        # -2 tanh(z) sech^2(z), both factors accurate in relative terms (1 - t^2 cancels for
        # large |z|, 1 - 2 / (exp(2z) + 1) near 0).
        e = tl.exp(-2.0 * tl.abs(z))
        g = -2.0 * _tanh(z) * (4.0 * e / ((1.0 + e) * (1.0 + e)))
    elif ACT == 5:
        g = tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)
    elif ACT == 6:
        s = _sigmoid(z)
        g = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    elif ACT == 7:
        s = _sigmoid(z)
        # >= 20, as torch's double backward masks it (x < threshold); act' itself is
        # sigmoid(z) up to z = 20 inclusive, 1 above.
        g = tl.where(z >= 20.0, 0.0, s * (1.0 - s))
    else:
        g = tl.zeros(z.shape, tl.float32)
    return g


@triton.jit
def _contractive_gemm_kernel(
    a_ptr, b_ptr, out_ptr, pre_ptr, bias_ptr, rs_ptr, gs_ptr, ks_ptr, e_ptr, q_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn, stride_em, stride_en,
    HAS_BIAS: tl.constexpr, HAS_RS: tl.constexpr, HAS_GS: tl.constexpr, HAS_KS: tl.constexpr,
    STORE_OUT: tl.constexpr, STORE_PRE: tl.constexpr, ROWDOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """P = (A * ks[None, :]) @ B + bias; O = P * rs[m] * gs[m // R, n] (fp32, contiguous out).

    Stores O (STORE_OUT) and P (STORE_PRE); ROWDOT 1: q[m] = sum_n O[m, n] E[m, n],
    ROWDOT 2: q[m] = sum_n O[m, n]^2 (launched with one program along n, which then walks
    every column tile so q is complete without atomics).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    step_n = BLOCK_N * tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    if HAS_RS:
        rs = tl.load(rs_ptr + rows64, mask=rmask, other=0.0)
    q = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(pid_n * BLOCK_N, N, step_n):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            ks64 = ks.to(tl.int64)
            a = tl.load(a_ptr + rows64[:, None] * stride_am + ks64[None, :] * stride_ak,
                        mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            if HAS_KS:
                a = a * tl.load(ks_ptr + ks64, mask=kmask, other=0.0)[None, :]
            b = tl.load(b_ptr + ks64[:, None] * stride_bk + cols64[None, :] * stride_bn,
                        mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols64, mask=cmask, other=0.0)[None, :]
        mask = rmask[:, None] & cmask[None, :]
        offs = rows64[:, None] * N + cols64[None, :]
        if STORE_PRE:
            tl.store(pre_ptr + offs, acc, mask=mask)
        if HAS_RS:
            acc = acc * rs[:, None]
        if HAS_GS:
            acc = acc * tl.load(gs_ptr + (rows64 // R)[:, None] * N + cols64[None, :],
                                mask=mask, other=0.0)
        if STORE_OUT:
            tl.store(out_ptr + offs, acc, mask=mask)
        if ROWDOT == 1:
            e = tl.load(e_ptr + rows64[:, None] * stride_em + cols64[None, :] * stride_en,
                        mask=mask, other=0.0)
            q += tl.sum(acc * e, axis=1)
        elif ROWDOT == 2:
            q += tl.sum(acc * acc, axis=1)
    if ROWDOT != 0:
        tl.store(q_ptr + rows64, q, mask=rmask)


@triton.jit
def _contractive_act_kernel(z_ptr, a_ptr, s_ptr, n, slope, ACT: tl.constexpr,
                            STORE_A: tl.constexpr, BLOCK: tl.constexpr):
    """a = act(z), s = act'(z) over n contiguous fp32 elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    slope = tl.cast(slope, tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    if STORE_A:
        tl.store(a_ptr + offs, apply_act(z, ACT, slope), mask=mask)
    tl.store(s_ptr + offs, act_grad(z, ACT, slope), mask=mask)


@triton.jit
def _contractive_bwd_dz_kernel(z_ptr, ds_ptr, da_ptr, dz_ptr, n, slope, ACT: tl.constexpr,
                               HAS_DS: tl.constexpr, HAS_DA: tl.constexpr, BLOCK: tl.constexpr):
    """dz = ds * act''(z) + da * act'(z) over n contiguous fp32 elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    slope = tl.cast(slope, tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    dz = tl.zeros((BLOCK,), tl.float32)
    if HAS_DS:
        dz += tl.load(ds_ptr + offs, mask=mask, other=0.0) * _act_grad2(z, ACT)
    if HAS_DA:
        dz += tl.load(da_ptr + offs, mask=mask, other=0.0) * act_grad(z, ACT, slope)
    tl.store(dz_ptr + offs, dz, mask=mask)


@triton.jit
def _contractive_groupdot_kernel(x_ptr, y_ptr, out_ptr, n_i, N,
                                 sxg, sxi, sxn, syg, syi, syn,
                                 BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[g, n] = sum_i X[g, i, n] Y[g, i, n] (any strides, 0 included; out contiguous)."""
    g = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for i0 in range(0, n_i, BLOCK_I):
        ii = (i0 + tl.arange(0, BLOCK_I)).to(tl.int64)
        mask = (ii < n_i)[:, None] & cmask[None, :]
        xv = tl.load(x_ptr + g * sxg + ii[:, None] * sxi + cols64[None, :] * sxn,
                     mask=mask, other=0.0)
        yv = tl.load(y_ptr + g * syg + ii[:, None] * syi + cols64[None, :] * syn,
                     mask=mask, other=0.0)
        acc += tl.sum(xv * yv, axis=0)
    tl.store(out_ptr + g * N + cols64, acc, mask=cmask)


# --- torch reference -----------------------------------------------------------------------------

def _act_grad2_torch(z: torch.Tensor, name: str) -> torch.Tensor:
    """act''(z), elementwise: the derivative of act_grad_torch as torch's autograd takes it
    (zero for identity/relu/leaky_relu, zero above softplus's linear threshold)."""
    if name in _LINEAR_PIECES:
        return torch.zeros_like(z)
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s) * (1 - 2 * s)
    if name == "tanh":
        t = torch.tanh(z)
        return -2 * t * (1 - t * t)
    if name == "gelu":
        return torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi)) * (2 - z * z)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    if name == "softplus":
        s = torch.sigmoid(z)
        # >= 20, as torch's double backward masks it (x < threshold).
        return torch.where(z >= 20, torch.zeros_like(z), s * (1 - s))
    raise ValueError(f"activation must be one of the known activations, got {name!r}")


def plan(batch: int, dims: Sequence[int]) -> str:
    """The cheapest evaluation order (see the module docstring) for ``batch`` samples of an
    encoder with widths ``dims`` = [d, h_1, ..., h_L]."""
    d, *h = (int(v) for v in dims)
    if len(h) == 1:
        return "closed"
    r, h1 = h[-1], h[0]
    blocks = -(-h1 // SYM_BLOCK)
    gram = (1 + (blocks + 1) / (2 * blocks)) * batch * r * h1 * h1 + 2 * h1 * h1 * d
    direct = 3 * batch * r * h1 * d
    return "gram" if gram < direct else "direct"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def contractive_penalty_reference(x: torch.Tensor, weights: Sequence[torch.Tensor],
                                  biases: Sequence[torch.Tensor | None],
                                  activations: Sequence[str],
                                  negative_slope: float = 0.01) -> torch.Tensor:
    """||J_f(x)||_F^2 per sample in plain differentiable torch: x (B, d) -> (B,) in x's dtype.

    The latent-side chain with batched matmuls and the Gram matrix of W_1 (no Jacobian is
    formed); autograd differentiates it, act' included.
    """
    cd = _compute_dtype(x.dtype)
    a = x.to(cd)
    s = []
    for w, b, act in zip(weights, biases, activations):
        z = F.linear(a, w.to(cd), None if b is None else b.to(cd))
        s.append(act_grad_torch(z, act, negative_slope))
        a = act_torch(z, act, negative_slope)
    w0 = weights[0].to(cd)
    if len(weights) == 1:
        return (s[0].pow(2) @ w0.pow(2).sum(1)).to(x.dtype)
    A = weights[-1].to(cd) * s[-2][:, None, :]             # (B, r, h_{L-1})
    for li in range(len(weights) - 2, 0, -1):
        A = torch.matmul(A, weights[li].to(cd)) * s[li - 1][:, None, :]
    # (B, r), clamped at 0 as the op's Gram order is (rounding where W_1^T a cancels).
    q = torch.einsum("bkn,nm,bkm->bk", A, w0 @ w0.t(), A).clamp(min=0)
    return (s[-1].pow(2) * q).sum(1).to(x.dtype)


# --- launchers -----------------------------------------------------------------------------------
# Every primitive has a Triton and a torch implementation with the same meaning; the algorithm
# (_forward/_backward) is written once on top of them.

GPU_GEMM_BLOCKS = (64, 64, 16, 8)  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps


def _gemm_blocks() -> tuple[int, int, int, int]:
    # The interpreter runs programs one after another: moderate tiles so odd test shapes still
    # span several tiles and K steps. GPUs: 64x64 tiles suit the thin layers of encoders; the
    # fp32 GEMM runs on FMA units with both operand tiles in registers: 4 warps spilled (BLOCK_K
    # 32: 450-1300 bytes on sm_80; 16: up to 64), 8 warps with BLOCK_K 16 do not (ptxas -v).
    return (32, 32, 32, 4) if interpreting() else GPU_GEMM_BLOCKS


def _mm(a, b, use_triton, *, bias=None, rs=None, gs=None, group=1, ks=None, rowdot=None,
        store_out=True, store_pre=False, out=None):
    """(out, pre, q) for P = (a * ks) @ b + bias, O = P * rs[:, None] * gs[m // group, n].

    a (M, K), b (K, N): any strides. rowdot: None, a tensor E (M, N) (q = rowsum(O * E)), or
    "self" (q = rowsum(O^2)). Results are contiguous, in a's dtype; missing ones are None.
    ``out``: a contiguous (M, N) buffer that receives O.
    """
    M, K = a.shape
    N = b.shape[1]
    if not use_triton:
        if ks is not None:
            a = a * ks[None, :]
        if out is not None:
            p = torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)
        else:
            p = torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
        pre = p if store_pre else None
        o = p.clone() if store_pre and (rs is not None or gs is not None) else p
        if rs is not None:
            o.mul_(rs[:, None])
        if gs is not None:
            o.view(-1, group, N).mul_(gs[:, None, :])
        q = None
        # vecdot, not einsum: einsum runs row dots as M tiny bmm's, several times slower.
        if isinstance(rowdot, torch.Tensor):
            q = torch.linalg.vecdot(o, rowdot)
        elif rowdot == "self":
            q = torch.linalg.vecdot(o, o)
        return (o if store_out else None), pre, q
    bm, bn, bk, warps = _gemm_blocks()
    # The kernel reads these vectors with unit stride (a bias may be a strided view).
    bias, rs, gs, ks = (None if t is None else t.contiguous() for t in (bias, rs, gs, ks))
    if out is None and store_out:
        out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    pre = torch.empty((M, N), device=a.device, dtype=a.dtype) if store_pre else None
    q = torch.empty((M,), device=a.device, dtype=a.dtype) if rowdot is not None else None
    e = rowdot if isinstance(rowdot, torch.Tensor) else None
    mode = 0 if rowdot is None else (1 if e is not None else 2)
    dummy = a
    grid = (triton.cdiv(M, bm), 1 if mode else triton.cdiv(N, bn))
    if M > 0 and N > 0:
        _contractive_gemm_kernel[grid](
            a, b, out if out is not None else dummy, pre if pre is not None else dummy,
            bias if bias is not None else dummy, rs if rs is not None else dummy,
            gs if gs is not None else dummy, ks if ks is not None else dummy,
            e if e is not None else dummy, q if q is not None else dummy,
            M, N, K, group,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            e.stride(0) if e is not None else 0, e.stride(1) if e is not None else 0,
            HAS_BIAS=bias is not None, HAS_RS=rs is not None, HAS_GS=gs is not None,
            HAS_KS=ks is not None, STORE_OUT=store_out, STORE_PRE=store_pre, ROWDOT=mode,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        )
    elif q is not None:
        q.zero_()
    return out, pre, q


def _act(z, name, slope, use_triton, store_a=True):
    """(act(z) or None, act'(z)) for a contiguous z."""
    if not use_triton:
        # clone: identity's act_torch returns z itself, and op outputs may not alias.
        a = act_torch(z, name, slope).clone() if store_a else None
        return a, act_grad_torch(z, name, slope)
    a = torch.empty_like(z) if store_a else None
    s = torch.empty_like(z)
    n = z.numel()
    block = 1024
    if n:
        _contractive_act_kernel[(triton.cdiv(n, block),)](
            z, a if a is not None else s, s, n, slope, ACT=activation_id(name),
            STORE_A=store_a, BLOCK=block)
    return a, s


def _dz(z, ds, da, name, slope, use_triton):
    """ds * act''(z) + da * act'(z); ds, da may be None (no such term)."""
    if not use_triton:
        out = torch.zeros_like(z)
        if ds is not None:
            out += ds * _act_grad2_torch(z, name)
        if da is not None:
            out += da * act_grad_torch(z, name, slope)
        return out
    dz = torch.empty_like(z)
    n = z.numel()
    block = 1024
    if n:
        _contractive_bwd_dz_kernel[(triton.cdiv(n, block),)](
            z, ds if ds is not None else z, da if da is not None else z, dz, n, slope,
            ACT=activation_id(name), HAS_DS=ds is not None, HAS_DA=da is not None, BLOCK=block)
    return dz


def _groupdot(x, y, use_triton):
    """out[g, n] = sum_i x[g, i, n] y[g, i, n] for 3-D views (y may broadcast, stride 0)."""
    if not use_triton:
        return (x * y).sum(1)  # einsum would run G tiny bmm's, several times slower
    G, n_i, N = x.shape
    out = torch.empty((G, N), device=x.device, dtype=x.dtype)
    block_n = min(128, triton.next_power_of_2(max(N, 1)))
    block_i = min(32, triton.next_power_of_2(max(n_i, 1)))
    if G and N:
        _contractive_groupdot_kernel[(G, triton.cdiv(N, block_n))](
            x, y, out, n_i, N, *x.stride(), *y.stride(), BLOCK_I=block_i, BLOCK_N=block_n)
    return out


# --- the algorithm -------------------------------------------------------------------------------

def _chunk(batch: int, r: int, widths: Sequence[int], device: torch.device) -> int:
    """Samples per chunk: the per-sample chain products (r x h each) of one chunk stay within
    a fixed budget, so peak memory does not grow with the batch beyond the kept V."""
    # fp32 elements per chain product: 2 MiB on CPUs (measured: no slower than whole-batch
    # products at B = 256, d = 784, for a third of the peak memory); GPUs need larger GEMMs.
    budget = 2**22 if device.type == "cuda" else 2**19
    return max(1, min(batch, budget // max(1, r * max(widths))))


def _chain(ws, ss, r, use_triton, needs_ds=None):
    """The latent-side chain for the samples of ``ss`` (list of (b, h_l)) -> (As, Cs).

    As[0] = W_L * s_{L-1} (b*r, h_{L-1}); step j (l = L-1-j, 1-based) gives
    As[j+1] = C_j * s_{l-1} with C_j = As[j] W_l; As[-1] (b*r, h_1) is the chain's end.
    Cs[j] is kept only where ``needs_ds`` says the backward needs it (else None).
    """
    b = ss[0].shape[0]
    As = [(ws[-1][None] * ss[-2][:, None, :]).reshape(b * r, -1)]
    Cs = []
    for li in range(len(ws) - 2, 0, -1):
        keep_c = needs_ds is not None and needs_ds[li - 1]
        A, C, _ = _mm(As[-1], ws[li], use_triton, gs=ss[li - 1], group=r, store_pre=keep_c)
        As.append(A)
        Cs.append(C)
    return As, Cs


def _forward(x, weights, biases, activations, slope, order, use_triton, keep):
    """[P (B,), z_1..z_L, a_1..a_{L-1}, s_1..s_L] (+ [V or Y (B*r, n), q (B*r,)] for the
    chain orders) in the compute dtype.

    ``keep``: whether V = A G (gram) or Y = A W_1 (direct) is kept for the backward, which
    then recomputes only the cheaper chain. Chain products live one batch chunk at a time.
    """
    cd = _compute_dtype(x.dtype)
    B = x.shape[0]
    L = len(weights)
    ws = [w.to(cd) for w in weights]
    a = x.to(cd)
    zs, as_, ss = [], [], []
    for i, (w, b, act) in enumerate(zip(ws, biases, activations)):
        z, _, _ = _mm(a, w.t(), use_triton, bias=None if b is None else b.to(cd))
        last = i == L - 1
        a, s = _act(z, act, slope, use_triton, store_a=not last)
        zs.append(z)
        ss.append(s)
        if not last:
            as_.append(a)
    if order == "closed":
        P = (ss[0] * ss[0]) @ ws[0].pow(2).sum(1)
        return [P, *zs, *as_, *ss]
    r = ws[-1].shape[0]
    right = ws[0]                                           # Y = A W_1 (direct)
    if order == "gram":
        right, _, _ = _mm(ws[0], ws[0].t(), use_triton)      # G = W_1 W_1^T, once per batch
    n = right.shape[1]
    V = x.new_empty((B * r, n) if keep else (0,), dtype=cd)
    q = x.new_empty((B * r,), dtype=cd)
    step = _chunk(B, r, [w.shape[1] for w in ws], x.device)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        A = _chain(ws, [t[b0:b1] for t in ss], r, use_triton)[0][-1]
        out = V[b0 * r:b1 * r] if keep else None
        _, _, q[b0 * r:b1 * r] = _mm(A, right, use_triton, rowdot=A if order == "gram" else "self",
                                     store_out=keep, out=out)
    if order == "gram":
        # a^T G a = ||W_1^T a||^2 >= 0, but rounded it can fall below 0 where W_1^T a cancels
        # (see Accuracy in the module docstring): those rows read as 0, within the error.
        q.clamp_(min=0)
    P = (ss[-1] * ss[-1] * q.view(B, r)).sum(1)
    return [P, *zs, *as_, *ss, V, q]


def _backward(grad, x, weights, biases, activations, slope, order, saved, use_triton,
              needs_dx=True):
    """(dx, [dW_l], [db_l or None]) for grad (B,) of the penalty, in the compute dtype; dx is
    None unless ``needs_dx`` (training inputs rarely require grad: a B h_1 d GEMM saved)."""
    cd = _compute_dtype(x.dtype)
    B = x.shape[0]
    L = len(weights)
    ws = [w.to(cd) for w in weights]
    xc = x.to(cd)
    g = grad.to(cd)
    zs = saved[1:1 + L]
    as_ = saved[1 + L:2 * L]
    ss = saved[2 * L:3 * L]
    dws = [torch.zeros_like(w) for w in ws]
    # ds[l]: gradient of the penalty w.r.t. s_l = act'(z_l); None where act'' is zero.
    needs_ds = [act not in _LINEAR_PIECES for act in activations]
    ds: list[torch.Tensor | None] = [None] * L
    if order == "closed":
        rn = ws[0].pow(2).sum(1)
        if needs_ds[0]:
            ds[0] = 2 * ss[0] * g[:, None] * rn
        dws[0] += (2 * (g @ (ss[0] * ss[0])))[:, None] * ws[0]
    else:
        V, q = saved[3 * L:3 * L + 2]
        r = ws[-1].shape[0]
        s_last = ss[-1]
        dq = (g[:, None] * s_last * s_last).reshape(-1)            # (B*r,)
        if needs_ds[-1]:
            ds[-1] = 2 * s_last * g[:, None] * q.view(B, r)
        for li in range(L - 1):
            if needs_ds[li]:
                ds[li] = torch.empty_like(ss[li])
        dG = torch.zeros_like(ws[0][:, :1].expand(-1, ws[0].shape[0])) if order == "gram" \
            else None
        step = _chunk(B, r, [w.shape[1] for w in ws], x.device)
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            sc = [t[b0:b1] for t in ss]
            As, Cs = _chain(ws, sc, r, use_triton, needs_ds)
            A = As[-1]
            dq_c = dq[b0 * r:b1 * r]
            # dV = 2 dq * V (rows scaled) is never formed: the row scale moves onto the
            # smaller factors it multiplies (ks / rs epilogues), saving a pass over V.
            Vc, dq2 = V[b0 * r:b1 * r], 2 * dq_c
            if order == "gram":
                dA, rs = Vc, dq2                                      # d(a^T G a)/da = 2 G a
                _add_upper_gram(dG, A, dq_c, use_triton)
            else:
                dA, _, _ = _mm(Vc, ws[0].t(), use_triton, rs=dq2)    # Y = A W_1
                dws[0] += _mm(A.t(), Vc, use_triton, ks=dq2)[0]
                rs = None
            _chain_backward(dA, As, Cs, ws, sc, r, needs_ds,
                            [None if t is None else t[b0:b1] for t in ds], dws, use_triton,
                            rs=rs)
        if order == "gram":
            _mirror_upper(dG)
            dws[0] += _mm(dG, ws[0], use_triton)[0].mul_(2)         # G = W_1 W_1^T
    # Back through the encoder: z_l depends on x, W_l, b_l and the layers below.
    dbs: list[torch.Tensor | None] = [None] * L
    da = None
    dx = None
    for li in range(L - 1, -1, -1):
        dz = _dz(zs[li], ds[li], da, activations[li], slope, use_triton)
        inp = xc if li == 0 else as_[li - 1]
        dws[li] += _mm(dz.t(), inp, use_triton)[0]
        if biases[li] is not None:
            dbs[li] = dz.sum(0)
        if li > 0:
            da, _, _ = _mm(dz, ws[li], use_triton)
        elif needs_dx:
            dx, _, _ = _mm(dz, ws[0], use_triton)
    return dx, dws, dbs


def _add_upper_gram(acc, a, ks, use_triton):
    """acc += a^T diag(ks) a (a (M, n), acc (n, n)) on the upper block triangle only (blocks of
    SYM_BLOCK; diagonal blocks whole): the product is symmetric, :func:`_mirror_upper` fills
    the rest once."""
    n = a.shape[1]
    for i0 in range(0, n, SYM_BLOCK):
        i1 = min(n, i0 + SYM_BLOCK)
        acc[i0:i1, i0:] += _mm(a[:, i0:i1].t(), a[:, i0:], use_triton, ks=ks)[0]


def _mirror_upper(acc):
    """Copy the upper block triangle that :func:`_add_upper_gram` accumulated onto the lower."""
    n = acc.shape[0]
    for i0 in range(0, n, SYM_BLOCK):
        i1 = min(n, i0 + SYM_BLOCK)
        acc[i1:, i0:i1] = acc[i0:i1, i1:].t()


def _chain_backward(dA, As, Cs, ws, ss, r, needs_ds, ds, dws, use_triton, rs=None):
    """Undo the chain for one chunk: dA (b*r, h_1) -> ds[l] slices (written in place) and
    dW_l contributions (accumulated), from the input side up. ``rs`` (b*r,), if given, scales
    dA's rows: applied to As[j] and to the next dA (b*r, h_{l-1}) instead of to dA itself."""
    L = len(ws)
    b = ss[0].shape[0]
    if rs is not None and (not Cs or needs_ds[0]):  # the first step needs dA itself
        dA, rs = dA * rs[:, None], None
    for j in range(len(Cs) - 1, -1, -1):
        li = L - 2 - j                       # 0-based weight index of step j
        h_prev = ws[li].shape[1]
        dA3 = dA.view(b, r, h_prev)
        if needs_ds[li - 1]:
            ds[li - 1].copy_(_groupdot(dA3, Cs[j].view(b, r, h_prev), use_triton))
        dC = (dA3 * ss[li - 1][:, None, :]).view(b * r, h_prev)
        dws[li] += _mm(As[j].t(), dC, use_triton, ks=rs)[0]
        dA, _, _ = _mm(dC, ws[li].t(), use_triton, rs=rs)
        rs = None
    # First step: As[0] = W_L * s_{L-1}, broadcast over the chunk.
    h_prev = ws[-1].shape[1]
    dA3 = dA.view(b, r, h_prev)
    if needs_ds[-2]:
        ds[-2].copy_(_groupdot(dA3, ws[-1][None].expand(b, r, h_prev), use_triton))
    sp = ss[-2]
    dws[-1] += _groupdot(dA3.permute(1, 0, 2), sp[None].expand(r, b, h_prev), use_triton)


# --- custom ops ----------------------------------------------------------------------------------

def _expand(present: list[torch.Tensor], has_bias: list[bool]) -> list[torch.Tensor | None]:
    it = iter(present)
    return [next(it) if h else None for h in has_bias]


# The ops take the biases that exist plus a per-layer mask: a list holding None is one opaque
# leaf to the custom op's autograd, which could then return no bias gradients.
@torch.library.custom_op("aecore::contractive_penalty", mutates_args=())
def _penalty_op(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                has_bias: list[bool], act_ids: list[int], negative_slope: float, order: str,
                use_triton: bool, keep: bool) -> list[torch.Tensor]:
    """[P (B,) in x's dtype, then what the backward needs (compute dtype)].

    Activations travel as ids: custom op schemas have no list of strings.
    """
    activations = [ACTIVATIONS[i] for i in act_ids]
    out = _forward(x, weights, _expand(biases, has_bias), activations, negative_slope, order,
                   use_triton, keep)
    out[0] = out[0].to(x.dtype)
    return out


@_penalty_op.register_fake
def _(x, weights, biases, has_bias, act_ids, negative_slope, order, use_triton, keep):
    cd = _compute_dtype(x.dtype)
    B = x.shape[0]
    hs = [w.shape[0] for w in weights]
    new = lambda *shape: x.new_empty(shape, dtype=cd)
    out = [x.new_empty((B,))]
    out += [new(B, h) for h in hs]
    out += [new(B, h) for h in hs[:-1]]
    out += [new(B, h) for h in hs]
    if order == "closed":
        return out
    r = hs[-1]
    n = hs[0] if order == "gram" else x.shape[1]
    return out + [new(B * r, n) if keep else new(0), new(B * r)]


@torch.library.custom_op("aecore::contractive_penalty_backward", mutates_args=())
def _penalty_backward_op(grad: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                         biases: list[torch.Tensor], has_bias: list[bool], act_ids: list[int],
                         negative_slope: float, order: str, use_triton: bool,
                         saved: list[torch.Tensor], needs_dx: bool) -> list[torch.Tensor]:
    """[dx (empty unless needs_dx), dW_1..dW_L, db for each bias given], each in its input's
    dtype."""
    activations = [ACTIVATIONS[i] for i in act_ids]
    dx, dws, dbs = _backward(grad, x, weights, _expand(biases, has_bias), activations,
                             negative_slope, order, saved, use_triton, needs_dx)
    # Contiguous, whatever the inputs' strides: the fake kernel below promises exactly that.
    out = [dx.to(x.dtype).contiguous() if needs_dx else x.new_empty(0)]
    out += [dw.to(w.dtype).contiguous() for dw, w in zip(dws, weights)]
    out += [db.to(b.dtype).contiguous()
            for db, b in zip([d for d in dbs if d is not None], biases)]
    return out


@_penalty_backward_op.register_fake
def _(grad, x, weights, biases, has_bias, act_ids, negative_slope, order, use_triton, saved,
      needs_dx):
    # new_empty, not empty_like: the real op's results are contiguous, not in x's strides
    # (inductor asserts the strides the fake promises).
    return [x.new_empty(x.shape if needs_dx else (0,)),
            *(t.new_empty(t.shape) for t in (*weights, *biases))]


def _setup_context(ctx, inputs, output):
    x, weights, biases, has_bias, act_ids, slope, order, use_triton, _keep = inputs
    # Only P is differentiable; without this, autograd would allocate zero gradients as large
    # as the kept products for the other outputs.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, *weights, *biases, *output[1:])
    ctx.args = (len(weights), len(biases), list(has_bias), list(act_ids), slope, order,
                use_triton)


def _backward_fn(ctx, grads):
    L, n_b, has_bias, act_ids, slope, order, use_triton = ctx.args
    if grads[0] is None:  # no gradient reached P (set_materialize_grads(False)): none flows on
        return None, [None] * L, [None] * n_b, None, None, None, None, None, None
    tensors = ctx.saved_tensors
    x, weights = tensors[0], list(tensors[1:1 + L])
    biases = list(tensors[1 + L:1 + L + n_b])
    if _is_legacy_batched(grads[0]):
        # A batch of cotangents (autograd.grad(is_grads_batched=True), jacobian(vectorize=
        # True)) batches with torch's older vmap, which has no rule for an op returning a
        # list: the reference's autograd takes them instead.
        return (*_reference_vjp(grads[0], x, weights, biases, has_bias, act_ids, slope,
                                ctx.needs_input_grad[:3]), None, None, None, None, None, None)
    saved = [grads[0], *tensors[1 + L + n_b:]]  # slot 0 (P) is unused by the backward
    needs_dx = ctx.needs_input_grad[0]
    out = _penalty_backward_op(grads[0].contiguous(), x, weights, biases, has_bias, act_ids,
                               slope, order, use_triton, saved, needs_dx)
    return (out[0] if needs_dx else None), out[1:1 + L], out[1 + L:], None, None, None, None, \
        None, None


_penalty_op.register_autograd(_backward_fn, setup_context=_setup_context)

_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _reference_vjp(grad, x, weights, biases, has_bias, act_ids, slope, needs):
    """(dx, [dW], [db]) of <grad, P> through :func:`contractive_penalty_reference`'s autograd;
    None where ``needs`` (x, weights, biases) asks for none."""
    leaves = [t.detach().requires_grad_() for t in (x, *weights, *biases)]
    xs, ws, bs = leaves[0], leaves[1:1 + len(weights)], leaves[1 + len(weights):]
    with torch.enable_grad():
        P = contractive_penalty_reference(xs, ws, _expand(bs, has_bias),
                                          [ACTIVATIONS[i] for i in act_ids], slope)
        g = torch.autograd.grad(P, leaves, grad, allow_unused=True, materialize_grads=True)
    dx, dws, dbs = g[0], list(g[1:1 + len(ws)]), list(g[1 + len(ws):])
    return (dx if needs[0] else None, dws if needs[1] else [None] * len(dws),
            dbs if needs[2] else [None] * len(dbs))


def _looped(op):
    """A vmap rule for ``op`` that runs it once per entry of the mapped dimension: the op
    takes a whole batch of samples already, and this is for transforms over it (torch.func.vmap
    under torch.compile, where the public function can't route to the reference)."""
    def rule(info, in_dims, *args):
        outs = []
        for i in range(info.batch_size):
            call = []
            for a, d in zip(args, in_dims):
                if isinstance(d, (list, tuple)):  # a list of tensors, one dim each
                    call.append([t if dt is None else t.select(dt, i) for t, dt in zip(a, d)])
                else:
                    call.append(a if d is None else a.select(d, i))
            outs.append(op(*call))
        stacked = [torch.stack([o[j] for o in outs]) for j in range(len(outs[0]))]
        return stacked, [0] * len(stacked)
    return rule


_penalty_op.register_vmap(_looped(_penalty_op))
_penalty_backward_op.register_vmap(_looped(_penalty_backward_op))


# --- public function -----------------------------------------------------------------------------

def _validate(x, weights, biases, activations, negative_slope) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be a float32, float16, bfloat16 or float64 tensor, got "
                        f"{x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (batch, features), got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one feature, got shape {tuple(x.shape)}")
    for name, seq in (("weights", weights), ("biases", biases), ("activations", activations)):
        if isinstance(seq, (str, torch.Tensor)) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list or tuple (one entry per layer), "
                            f"got {type(seq).__name__}")
    if len(weights) == 0:
        raise ValueError("weights must hold at least one layer's weight, got an empty list")
    if len(biases) != len(weights) or len(activations) != len(weights):
        raise ValueError(f"weights, biases and activations must have one entry per layer; got "
                         f"lengths {len(weights)}, {len(biases)} and {len(activations)}")
    width = x.shape[1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights[{i}] must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() != 2:
            raise ValueError(f"weights[{i}] must be 2-D (out_features, in_features), got shape "
                             f"{tuple(w.shape)}")
        if w.shape[1] != width:
            what = "x's feature count" if i == 0 else f"weights[{i - 1}].shape[0]"
            raise ValueError(f"weights[{i}] must have {width} input features ({what}), got "
                             f"shape {tuple(w.shape)}")
        if w.shape[0] < 1:
            raise ValueError(f"weights[{i}] must have at least one output, got shape "
                             f"{tuple(w.shape)}")
        width = w.shape[0]
        if b is not None:
            if not isinstance(b, torch.Tensor):
                raise TypeError(f"biases[{i}] must be a torch.Tensor or None, got "
                                f"{type(b).__name__}")
            if tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"biases[{i}] must have shape ({w.shape[0]},), got "
                                 f"{tuple(b.shape)}")
        check_like(f"weights[{i}]", w, x)
        check_like(f"biases[{i}]", b, x)
    for i, act in enumerate(activations):
        activation_id(act, f"activations[{i}]")
    check_slope(negative_slope)


def contractive_penalty(x: torch.Tensor, weights: Sequence[torch.Tensor],
                        biases: Sequence[torch.Tensor | None], activations: Sequence[str], *,
                        negative_slope: float = 0.01, backend: str | None = None) -> torch.Tensor:
    """Per-sample ||J_f(x)||_F^2 of the MLP encoder f given by its layers -> (B,), x's dtype.

    x (B, d); weights[l] (h_l, h_{l-1}) with h_0 = d, any strides; biases[l] (h_l,) or None;
    activations[l] a name in ``aecore.kernels.ACTIVATIONS`` (``negative_slope`` is
    leaky_relu's). Differentiable w.r.t. x, every weight and every bias; act' at kinks is
    torch's. float32/16, bfloat16 compute in fp32; float64 runs on the torch backend. Under
    autocast it runs in float32, as torch's losses do.
    """
    if (isinstance(x, torch.Tensor) and isinstance(weights, (list, tuple))
            and isinstance(biases, (list, tuple)) and autocasting(x) is not None):
        # Inputs cast as autocast casts a float32 op's, then autocast off: the torch path's
        # matmuls would otherwise run in bf16 beside its float32 elementwise terms.
        x, *weights = autocast_cast(torch.float32, x, *weights)
        biases = autocast_cast(torch.float32, *biases)
        with torch.autocast(x.device.type, enabled=False):
            return contractive_penalty(x, weights, biases, activations,
                                       negative_slope=negative_slope, backend=backend)
    _validate(x, weights, biases, activations, negative_slope)
    weights, biases, activations = list(weights), list(biases), list(activations)
    tensors = [x, *weights, *[b for b in biases if b is not None]]
    which = resolve(backend, *tensors)
    slope = float(negative_slope)
    # The op has no forward-mode or functorch rules (vmap, jvp, jacfwd): the reference has.
    if exporting() or transformed(*tensors):
        return contractive_penalty_reference(x, weights, biases, activations, slope)
    if x.shape[0] == 0:
        # Connected to every input, so gradients are zeros of their shapes, not errors.
        return x.new_zeros((0,)) + 0 * sum(t.sum() for t in tensors)
    order = plan(x.shape[0], [x.shape[1], *[w.shape[0] for w in weights]])
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    act_ids = [activation_id(a) for a in activations]
    out = _penalty_op(x, weights, [b for b in biases if b is not None],
                      [b is not None for b in biases], act_ids, slope, order,
                      which == "triton", keep)
    return out[0]


# --- ahead-of-time compile cases ------------------------------------------------------------------

_GEMM_ARGS = ("a_ptr", "b_ptr", "out_ptr", "pre_ptr", "bias_ptr", "rs_ptr", "gs_ptr", "ks_ptr",
              "e_ptr", "q_ptr", "M", "N", "K", "R", "stride_am", "stride_ak", "stride_bk",
              "stride_bn", "stride_em", "stride_en")
_GEMM_FLAGS = ("HAS_BIAS", "HAS_RS", "HAS_GS", "HAS_KS", "STORE_OUT", "STORE_PRE")


def aot_cases() -> list[dict]:
    """Every kernel this op launches on a GPU (all fp32: inputs are computed in fp32), for
    ``aecore.kernels.aot``: the GEMM in each role the algorithm gives it (unit strides as the
    launches have them), the activation and pre-activation-gradient kernels for a piecewise
    linear and a smooth activation, and the grouped reduction."""
    bm, bn, bk, warps = GPU_GEMM_BLOCKS
    gemms = [
        # (role, flags set, ROWDOT, arguments with unit stride)
        ("layer", {"HAS_BIAS", "STORE_OUT"}, 0, ("stride_ak", "stride_bk")),  # x @ W^T + b
        ("chain", {"HAS_GS", "STORE_OUT", "STORE_PRE"}, 0, ("stride_ak", "stride_bn")),
        ("quadform", {"STORE_OUT"}, 1, ("stride_ak", "stride_bn", "stride_en")),  # q = a.(aG)
        ("gram_grad", {"HAS_KS", "STORE_OUT"}, 0, ("stride_am", "stride_bn")),  # A^T diag A
    ]
    cases = []
    for role, flags, rowdot, unit in gemms:
        runtime = [a for a in _GEMM_ARGS if a not in unit]
        cases.append({
            "name": f"contractive_gemm_{role}_fp32",
            "fn": _contractive_gemm_kernel,
            "signature": {a: "*fp32" if a.endswith("_ptr") else "i32" for a in runtime},
            "constexprs": {**dict.fromkeys(unit, 1), **{f: f in flags for f in _GEMM_FLAGS},
                           "ROWDOT": rowdot, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
            "divisible": [a for a in runtime if a.endswith("_ptr") or a in ("N", "K")],
            "num_warps": warps, "num_stages": 3, "gemm": False, "dtype": "fp32",
        })
    elementwise = {"z_ptr": "*fp32", "n": "i32", "slope": "fp32"}
    for act in ("relu", "gelu"):
        cases.append({
            "name": f"contractive_act_{act}_fp32", "fn": _contractive_act_kernel,
            "signature": {**elementwise, "a_ptr": "*fp32", "s_ptr": "*fp32"},
            "constexprs": {"ACT": activation_id(act), "STORE_A": True, "BLOCK": 1024},
            "divisible": ["z_ptr", "a_ptr", "s_ptr"],
            "num_warps": 4, "num_stages": 3, "gemm": False, "dtype": "fp32",
        })
        cases.append({
            "name": f"contractive_bwd_dz_{act}_fp32", "fn": _contractive_bwd_dz_kernel,
            "signature": {**elementwise, "ds_ptr": "*fp32", "da_ptr": "*fp32", "dz_ptr": "*fp32"},
            "constexprs": {"ACT": activation_id(act), "HAS_DS": True, "HAS_DA": True,
                           "BLOCK": 1024},
            "divisible": ["z_ptr", "ds_ptr", "da_ptr", "dz_ptr"],
            "num_warps": 4, "num_stages": 3, "gemm": False, "dtype": "fp32",
        })
    cases.append({
        "name": "contractive_groupdot_fp32", "fn": _contractive_groupdot_kernel,
        "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n_i": "i32",
                      "N": "i32", "sxg": "i32", "sxi": "i32", "syg": "i32", "syi": "i32"},
        "constexprs": {"sxn": 1, "syn": 1, "BLOCK_I": 32, "BLOCK_N": 128},
        "divisible": ["x_ptr", "y_ptr", "out_ptr", "N", "sxi", "syi"],
        "num_warps": 4, "num_stages": 3, "gemm": False, "dtype": "fp32",
    })
    return cases
