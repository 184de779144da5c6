"""The fused encoder layer: ``y = act(x @ weight.T + bias)``, forward and backward.

x (..., K), weight (N, K), bias (N,) -> y (..., N). Internally x is viewed as (M, K).

Forward: one tiled GEMM (grouped program order) with bias and activation applied to the fp32
accumulator. Backward: dZ = dY * act'(.) in one elementwise pass, then dX = dZ @ W and
dW = dZ^T @ X as GEMMs, with db = column sums of dZ accumulated inside the dW GEMM (the programs of
its first column band already stream every dZ tile, so db costs no extra pass over dZ).

What the forward keeps for the backward, the least each activation needs:

- identity: nothing but x and weight (dZ = dY);
- relu, leaky_relu (slope >= 0), sigmoid, tanh: the output y, which exists anyway
  (relu'/leaky_relu' from the sign of y, sigmoid' = y (1 - y), tanh' = 1 - y^2). The sign of y
  is that of the fp32 pre-activation z except where y rounds to 0: 0 < z <= 2**-25 (~3e-8,
  half fp16's smallest subnormal) in fp16, 0 < z <= 2**-134 in bf16. There relu' is taken as 0
  and leaky_relu' as the slope, not 1, on both backends (as torch's own fp16 layer does, which
  rounds z before the activation); keeping z for this would cost one more (M, N) tensor;
- gelu, silu, softplus, leaky_relu (slope < 0): the pre-activation z, one extra (M, N) tensor,
  cheaper than recomputing the forward GEMM in the backward.

Dispatch in ``fused_linear``: under torch.export / ONNX export, the reference math (standard ops);
the Triton backend, and anything under torch.compile, through the custom op ``aecore::fused_linear``
(one opaque differentiable node, its backward the custom op ``aecore::fused_linear_backward``);
the torch backend in eager mode directly, without the custom op's Python dispatch layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from aecore.kernels._activations import (
    ACTIVATIONS,
    act_grad,
    act_torch,
    activation_id,
    apply_act,
)
from aecore.kernels._backend import (
    autocast_cast,
    autocasting,
    check_like,
    check_slope,
    eager_cpu,
    exporting,
    first_order_only,
    interpreting,
    resolve,
    transformed,
)

__all__ = ["fused_linear", "fused_linear_reference", "aot_cases"]

_RELU = activation_id("relu")


# --- autotune configs ----------------------------------------------------------------------------

def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# The configs shipped for GPUs (Ampere and Hopper). Tensor-core GEMMs (fp16, bf16, TF32): large
# tiles for big GEMMs, narrower ones for the thin layers of autoencoders (N or K of 32-128), where
# a 128x128 tile would leave most SMs idle.
MMA_CONFIGS = [
    _cfg(128, 128, 32, 8, 3),
    _cfg(128, 64, 32, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 32, 4, 4),
]
# IEEE fp32 runs on FMA units with both operand tiles held in registers: BLOCK_K = 32 spills
# there (seen: up to 300 bytes on sm_80), so these keep BLOCK_K at 16.
FMA_CONFIGS = [
    _cfg(128, 128, 16, 8, 3),
    _cfg(128, 64, 16, 4, 3),
    _cfg(64, 128, 16, 4, 3),
    _cfg(64, 64, 16, 4, 3),
]
GPU_CONFIGS = MMA_CONFIGS + FMA_CONFIGS
# The interpreter runs one program after another and rejects several configs ("0 active
# drivers"): one config with small tiles so odd test shapes still span several tiles and K steps.
INTERPRETER_CONFIG = _cfg(32, 32, 32, 4, 1, group=2)


def _configs() -> list[triton.Config]:
    return [INTERPRETER_CONFIG] if interpreting() else list(GPU_CONFIGS)


def _uses_fma(dtype: torch.dtype, precision: str) -> bool:
    return dtype == torch.float32 and precision == "ieee"


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The FMA configs for IEEE fp32, the tensor-core ones otherwise."""
    a = named_args.get("x_ptr", named_args.get("a_ptr"))
    fma = _uses_fma(a.dtype, kwargs["PRECISION"])
    keep = [c for c in configs if any(c is f for f in FMA_CONFIGS) == fma]
    return keep or configs


_PRUNE = {"early_config_prune": _prune}


# --- Triton kernels ------------------------------------------------------------------------------

@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program: consecutive programs walk GROUP_M tile rows down one
    tile column before moving right, so the operand tiles they share are still in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    local = pid % band
    return first_m + local % rows, local // rows


@triton.jit
def _tile_matmul(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n,
                 ROWSUM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of A (M, K) @ B (K, N), any strides, int64 offsets;
    with ROWSUM also the fp32 row sums of this tile's rows of A."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
    in_m = (rm < M)[:, None]
    in_n = (rn < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_rows + kk.to(tl.int64)[None, :] * stride_ak,
                    mask=in_m & (kk < K)[None, :], other=0.0)
        b = tl.load(b_cols + kk.to(tl.int64)[:, None] * stride_bk,
                    mask=(kk < K)[:, None] & in_n, other=0.0)
        if UPCAST:
            # The interpreter gets every bf16 operation wrong (tl.dot included): fp32 there.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ROWSUM:
            rsum += tl.sum(a.to(tl.float32), axis=1)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc, rsum, rm, rn


@triton.autotune(configs=_configs(), key=["M", "N", "K", "PRECISION"], prune_configs_by=_PRUNE)
@triton.jit
def _fused_linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, slope,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = act(x @ w.T + b) for x (M, K), w (N, K) strided; y and z (M, N) contiguous."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, _, rm, rn = _tile_matmul(x_ptr, w_ptr, M, N, K, stride_xm, stride_xk, stride_wk,
                                  stride_wn, pid_m, pid_n, False, PRECISION, UPCAST,
                                  BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if STORE_Z:
        tl.store(z_ptr + offs, acc.to(z_ptr.dtype.element_ty), mask=mask)
    y = apply_act(acc, ACT, tl.cast(slope, tl.float32))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_linear_bwd_dz_kernel(g_ptr, s_ptr, dz_ptr, M, N, stride_gm, stride_gn, slope,
                                ACT: tl.constexpr, FROM_Y: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dz = g * act'(.) for g (M, N) strided (stride 0 allowed); s, dz (M, N) contiguous.

    ``s`` is the output y when FROM_Y (relu, leaky_relu with slope >= 0, sigmoid, tanh), else the
    pre-activation z. The relu mask matches torch's threshold_backward: zero where y <= 0, which
    includes a positive z whose y rounded to 0 in fp16/bf16 (see the module docstring).
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    rm64 = rm.to(tl.int64)[:, None]
    g = tl.load(g_ptr + rm64 * stride_gm + rn.to(tl.int64)[None, :] * stride_gn, mask=mask,
                other=0.0).to(tl.float32)
    offs = rm64 * N + rn[None, :]
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    slope = tl.cast(slope, tl.float32)
    if FROM_Y:
        if ACT == 1:
            dz = tl.where(s <= 0.0, 0.0, g)
        elif ACT == 2:
            dz = tl.where(s > 0.0, g, g * slope)
        elif ACT == 3:
            dz = g * (s * (1.0 - s))
        else:
            dz = g * (1.0 - s * s)
    else:
        dz = g * act_grad(s, ACT, slope)
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(), key=["M", "N", "K", "PRECISION"], prune_configs_by=_PRUNE)
@triton.jit
def _fused_linear_bwd_gemm_kernel(
    a_ptr, b_ptr, c_ptr, rowsum_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    ROWSUM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c (M, N) contiguous = a (M, K) @ b (K, N), any strides; with ROWSUM also
    rowsum (M,) = a.sum(1), written by the programs of the first column band.

    dX = dZ @ W and dW = dZ^T @ X (+ db = column sums of dZ) are both this kernel.
    """
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, rsum, rm, rn = _tile_matmul(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk,
                                     stride_bn, pid_m, pid_n, ROWSUM, PRECISION, UPCAST,
                                     BLOCK_M, BLOCK_N, BLOCK_K)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=mask)
    if ROWSUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + rm, rsum.to(rowsum_ptr.dtype.element_ty), mask=rm < M)


# --- torch reference -----------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 compute in fp32 like the kernels: one rounding, at the end.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # Only convert when needed: an exported graph then has no no-op casts in it.
    return t if t is None or t.dtype == dtype else t.to(dtype)


def fused_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                           activation: str = "relu", negative_slope: float = 0.01) -> torch.Tensor:
    """act(x @ weight.T + bias) in plain differentiable torch: x (..., K), weight (N, K),
    bias (N,) or None -> (..., N) in x's dtype (fp16/bf16 computed in fp32)."""
    cd = _compute_dtype(x.dtype)
    z = F.linear(_as(x, cd), _as(weight, cd), _as(bias, cd))
    return _as(act_torch(z, activation, negative_slope), x.dtype)


def _saves_output(activation: str, negative_slope: float) -> bool:
    """True when act' is a function of the output y (see the module docstring)."""
    if activation == "leaky_relu":
        return negative_slope >= 0
    return activation in ("relu", "sigmoid", "tanh")


def _stores_z(activation: str, negative_slope: float) -> bool:
    return activation != "identity" and not _saves_output(activation, negative_slope)


_INPLACE = {"relu": torch.relu_, "sigmoid": torch.sigmoid_, "tanh": torch.tanh_}


def _torch_forward(x, weight, bias, activation, slope):
    """(y, z) for 2-D x with torch ops: z (M, N) when the backward needs it, else None."""
    cd = _compute_dtype(x.dtype)
    xc, wc = _as(x, cd), _as(weight, cd)
    z = torch.mm(xc, wc.t()) if bias is None else torch.addmm(_as(bias, cd), xc, wc.t())
    if activation == "identity":
        return _as(z, x.dtype), None
    if _saves_output(activation, slope):
        # z is not kept, so the activation can overwrite it: no second (M, N) buffer.
        y = (F.leaky_relu_(z, slope) if activation == "leaky_relu"
             else _INPLACE[activation](z))
        return _as(y, x.dtype), None
    return _as(act_torch(z, activation, slope), x.dtype), _as(z, x.dtype)


def _torch_dz(g, s, activation, slope):
    """dY * act'(.) through torch's own backward functions (same values at the kinks); relu's
    and leaky_relu's masks come from y when that is what ``s`` is (see the module docstring)."""
    aten = torch.ops.aten
    if activation == "identity":
        return g
    if activation == "relu":
        return aten.threshold_backward(g, s, 0)
    if activation == "leaky_relu":
        return aten.leaky_relu_backward(g, s, slope, _saves_output(activation, slope))
    if activation == "sigmoid":
        return aten.sigmoid_backward(g, s)
    if activation == "tanh":
        return aten.tanh_backward(g, s)
    if activation == "gelu":
        return aten.gelu_backward(g, s)
    if activation == "silu":
        return aten.silu_backward(g, s)
    return aten.softplus_backward(g, s, 1.0, 20.0)


def _torch_backward(grad, x, weight, saved, has_bias, activation, slope, need_x, need_w):
    cd = _compute_dtype(x.dtype)
    dz = _torch_dz(_as(grad, cd), _as(saved, cd), activation, slope)
    dx = _as(torch.mm(dz, _as(weight, cd)), x.dtype) if need_x else x.new_empty((0,))
    dw = _as(torch.mm(dz.t(), _as(x, cd)), x.dtype) if need_w else x.new_empty((0,))
    db = _as(dz.sum(0), x.dtype) if has_bias else x.new_empty((0,))
    return dx, dw, db


# --- Triton launchers ----------------------------------------------------------------------------

def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()


# Elementwise dZ tiles: 2048 elements, 16 per thread at 4 warps.
_DZ_BLOCK = (32, 64)


def _gemm_grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _triton_forward(x, weight, bias, activation, slope, allow_tf32):
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    store_z = _stores_z(activation, slope)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype) if store_z else x.new_empty((0,))
    if M == 0 or N == 0:
        return y, z
    b = bias.contiguous() if bias is not None else y
    _fused_linear_fwd_kernel[_gemm_grid(M, N)](
        x, weight, b, y, z if store_z else y, M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), slope,
        HAS_BIAS=bias is not None, ACT=activation_id(activation), STORE_Z=store_z,
        PRECISION=_precision(x.dtype, allow_tf32), UPCAST=_upcast(x.dtype),
    )
    return y, z


def _triton_gemm(a, b, out, rowsum, precision):
    """out = a @ b (+ rowsum = a.sum(1)) for strided 2-D a (M, K), b (K, N); out contiguous."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    _fused_linear_bwd_gemm_kernel[_gemm_grid(M, N)](
        a, b, out, rowsum if rowsum is not None else out, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        ROWSUM=rowsum is not None, PRECISION=precision, UPCAST=_upcast(a.dtype),
    )


def _triton_backward(grad, x, weight, saved, has_bias, activation, slope, allow_tf32,
                     need_x, need_w):
    M, K = x.shape
    N = weight.shape[0]
    if activation == "identity":
        dz = grad  # any strides, stride 0 included: the GEMMs take them as they are
    else:
        dz = torch.empty((M, N), device=x.device, dtype=x.dtype)
        if M > 0 and N > 0:
            block_m, block_n = _DZ_BLOCK
            grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
            _fused_linear_bwd_dz_kernel[grid](
                grad, saved, dz, M, N, grad.stride(0), grad.stride(1), slope,
                ACT=activation_id(activation), FROM_Y=_saves_output(activation, slope),
                BLOCK_M=block_m, BLOCK_N=block_n,
            )
    precision = _precision(x.dtype, allow_tf32)
    # Outputs of a custom op may not alias each other: a fresh empty for each one not asked for.
    dx = x.new_empty((0,))
    if need_x:
        dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
        _triton_gemm(dz, weight, dx, None, precision)
    dw, db = x.new_empty((0,)), x.new_empty((0,))
    fused_db = has_bias and need_w and K > 0
    if has_bias:
        db = torch.empty((N,), device=x.device, dtype=x.dtype)
    if need_w:
        dw = torch.empty((N, K), device=x.device, dtype=weight.dtype)
        _triton_gemm(dz.t(), x, dw, db if fused_db else None, precision)
    if has_bias and not fused_db:
        # Weight frozen (or K == 0, no dW tiles): db alone, as an fp32 column sum.
        db.copy_(dz.sum(0, dtype=torch.float32))
    return dx, dw, db


# --- custom ops ----------------------------------------------------------------------------------

@torch.library.custom_op("aecore::fused_linear", mutates_args=())
def _fused_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     activation: str, negative_slope: float, use_triton: bool,
                     allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z): y (M, N) = act(x @ weight.T + bias); z (M, N) the pre-activation when the
    backward needs it, else an empty (0,) tensor."""
    if use_triton:
        return _triton_forward(x, weight, bias, activation, negative_slope, allow_tf32)
    y, z = _torch_forward(x, weight, bias, activation, negative_slope)
    return y, x.new_empty((0,)) if z is None else z


@_fused_linear_op.register_fake
def _(x, weight, bias, activation, negative_slope, use_triton, allow_tf32):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    z = (x.new_empty((x.shape[0], weight.shape[0])) if _stores_z(activation, negative_slope)
         else x.new_empty((0,)))
    return y, z


@torch.library.custom_op("aecore::fused_linear_backward", mutates_args=())
def _fused_linear_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              saved: torch.Tensor, has_bias: bool, activation: str,
                              negative_slope: float, use_triton: bool, allow_tf32: bool,
                              need_x: bool, need_w: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, K), dw (N, K), db (N,)); each is an empty (0,) tensor when not asked for."""
    if use_triton:
        return _triton_backward(grad, x, weight, saved, has_bias, activation, negative_slope,
                                allow_tf32, need_x, need_w)
    return _torch_backward(grad, x, weight, saved, has_bias, activation, negative_slope,
                           need_x, need_w)


@_fused_linear_backward_op.register_fake
def _(grad, x, weight, saved, has_bias, activation, negative_slope, use_triton, allow_tf32,
      need_x, need_w):
    dx = x.new_empty(x.shape if need_x else (0,))
    dw = weight.new_empty(weight.shape if need_w else (0,))
    db = x.new_empty((weight.shape[0],) if has_bias else (0,))
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, slope, use_triton, allow_tf32 = inputs
    y, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(x, weight, y if _saves_output(activation, slope) else z)
    ctx.args = (bias is not None, activation, slope, use_triton, allow_tf32)


def _backward(ctx, grad_y, grad_z):
    x, weight, saved = ctx.saved_tensors
    has_bias, activation, slope, use_triton, allow_tf32 = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.aecore.fused_linear_backward(
        grad_y, x, weight, saved, has_bias and need_b, activation, slope, use_triton,
        allow_tf32, need_x, need_w)
    return (dx if need_x else None, dw if need_w else None, db if has_bias and need_b else None,
            None, None, None, None)


_fused_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _TorchFusedLinear(torch.autograd.Function):
    """The torch backend in eager mode for fp16/bf16: fp32 math as in the kernels, saving the
    half-precision inputs (eager autograd over the upcasting reference would save fp32 copies),
    without the custom op's dispatch layers (about 0.1 ms a call in Python)."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, slope):
        y, z = _torch_forward(x, weight, bias, activation, slope)
        ctx.save_for_backward(x, weight, y if _saves_output(activation, slope) else z)
        ctx.args = (bias is not None, activation, slope)
        return y

    @staticmethod
    def backward(ctx, grad):
        first_order_only("fused_linear")
        x, weight, saved = ctx.saved_tensors
        has_bias, activation, slope = ctx.args
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = _torch_backward(grad, x, weight, saved, has_bias and need_b, activation,
                                     slope, need_x, need_w)
        return (dx if need_x else None, dw if need_w else None,
                db if has_bias and need_b else None, None, None)


# --- public function -----------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Dtypes whose CPU path is eager autograd over the reference.
_EAGER_DTYPES = (torch.float32, torch.float64)


def _check_tensor(t: object, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or "
                        f"float64), got {t.dtype}")


def _validate(x, weight, bias, negative_slope, allow_tf32) -> None:
    _check_tensor(x, "x")
    _check_tensor(weight, "weight")
    if bias is not None:
        _check_tensor(bias, "bias")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a 0-d tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x.shape[-1] must equal weight.shape[1] (in_features = "
                         f"{weight.shape[1]}), got x of shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) (out_features), got "
                         f"{tuple(bias.shape)}")
    check_like("weight", weight, x)
    check_like("bias", bias, x)
    check_slope(negative_slope)
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool, got {type(allow_tf32).__name__}")


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 activation: str = "relu", *, negative_slope: float = 0.01,
                 backend: str | None = None, allow_tf32: bool = False) -> torch.Tensor:
    """``act(x @ weight.T + bias)`` as one differentiable op.

    x (..., in_features), weight (out_features, in_features), bias (out_features,) or None
    -> (..., out_features) in x's dtype. Activations: see ``aecore.kernels.ACTIVATIONS``;
    ``negative_slope`` is leaky_relu's. ``backend``: "auto" | "triton" | "torch" (see
    ``_backend.resolve``). fp32 GEMMs are IEEE unless ``allow_tf32``; fp16/bf16 accumulate in
    fp32; float64 runs on the torch backend.
    """
    if (backend is None and allow_tf32 is False and type(negative_slope) is float
            and isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
            and x.dtype in _EAGER_DTYPES and weight.dtype == x.dtype and weight.dim() == 2
            and x.dim() and x.shape[-1] == weight.shape[1]
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == x.dtype
                                  and bias.shape == weight.shape[:1]))
            and activation in ACTIVATIONS and math.isfinite(negative_slope)
            and eager_cpu(x, weight, bias) and not torch.is_autocast_enabled("cpu")):
        # The usual call (valid fp32/fp64 CPU tensors in eager mode, no options), checked in
        # one expression: eager autograd over the reference (below) without the general
        # path's checks, which cost 20-35 us a call right after a GEMM (cold caches), a tenth
        # of a 64 x 784 -> 512 layer.
        return fused_linear_reference(x, weight, bias, activation, negative_slope)
    if isinstance(x, torch.Tensor) and (dt := autocasting(x)) is not None:
        # As F.linear under autocast: in autocast's dtype (the casts are differentiable, so
        # float32 parameters get float32 gradients), whatever dtype the layer before gave.
        x, weight, bias = autocast_cast(dt, x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            return fused_linear(x, weight, bias, activation, negative_slope=negative_slope,
                                backend=backend, allow_tf32=allow_tf32)
    _validate(x, weight, bias, negative_slope, allow_tf32)
    activation_id(activation)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    use_triton = resolve(backend, *tensors) == "triton"
    if exporting() or transformed(*tensors):
        # Plain torch ops: ONNX gets Gemm/MatMul + standard activation nodes, and torch.func
        # transforms (jvp for the Hutchinson estimate, vmap/jacrev) get rules they know.
        return fused_linear_reference(x, weight, bias, activation, float(negative_slope))
    slope = float(negative_slope)
    compiling = torch.compiler.is_compiling()
    if not (use_triton or compiling) and x.dtype in _EAGER_DTYPES:
        # Eager autograd over the reference is eager's own ops (addmm, the activation and their
        # C++ backward nodes, saving the same tensors); measured as fast as F.linear + act,
        # where a Python autograd.Function costs ~15 us more per call.
        return fused_linear_reference(x, weight, bias, activation, slope)
    # Explicit rows, not -1: reshape(-1, 0) is ambiguous for an empty x (in_features == 0).
    x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if use_triton or compiling:
        # One opaque differentiable node for torch.compile, whichever backend runs inside.
        y, _ = torch.ops.aecore.fused_linear(x2, weight, bias, activation, slope, use_triton,
                                             allow_tf32)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        y = _TorchFusedLinear.apply(x2, weight, bias, activation, slope)
    else:
        y = _torch_forward(x2, weight, bias, activation, slope)[0]
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


# --- ahead-of-time compile cases ------------------------------------------------------------------

# (name, dtype, PRECISION): every way the GEMMs are launched; fp32 twice (IEEE default, TF32).
_AOT_VARIANTS = (("fp32", torch.float32, "ieee"), ("tf32", torch.float32, "tf32"),
                 ("fp16", torch.float16, "ieee"), ("bf16", torch.bfloat16, "ieee"))
_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_cases() -> list[dict]:
    """Every (kernel, operand layout, dtype, GPU config) the autotuner can launch with contiguous
    tensors, for ``aecore.kernels.aot``.

    Forward with relu; backward GEMMs as dX = dZ @ W and dW = dZ^T @ X with the fused db
    row sum (the largest register footprint of each). Unit strides are compile-time constants,
    as Triton specialises them at launch.
    """
    cases = []
    gemm_layouts = (
        # name, kernel, signature (runtime args), unit-stride args, ROWSUM
        ("fwd", _fused_linear_fwd_kernel,
         ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "z_ptr", "M", "N", "K", "stride_xm", "stride_wn",
          "slope"), ("stride_xk", "stride_wk"), None),
        ("bwd_dx", _fused_linear_bwd_gemm_kernel,
         ("a_ptr", "b_ptr", "c_ptr", "rowsum_ptr", "M", "N", "K", "stride_am", "stride_bk"),
         ("stride_ak", "stride_bn"), False),
        ("bwd_dw", _fused_linear_bwd_gemm_kernel,
         ("a_ptr", "b_ptr", "c_ptr", "rowsum_ptr", "M", "N", "K", "stride_ak", "stride_bk"),
         ("stride_am", "stride_bn"), True),
    )
    for vname, dtype, precision in _AOT_VARIANTS:
        ptr = f"*{_TL_NAME[dtype]}"
        fma = _uses_fma(dtype, precision)
        configs = FMA_CONFIGS if fma else MMA_CONFIGS
        for kname, fn, args, unit, rowsum in gemm_layouts:
            sig = {a: ptr if a.endswith("_ptr") else ("fp32" if a == "slope" else "i32")
                   for a in args}
            extra = ({"HAS_BIAS": True, "ACT": _RELU, "STORE_Z": False} if rowsum is None
                     else {"ROWSUM": rowsum})
            for cfg in configs:
                meta = dict(cfg.kwargs)
                tag = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**meta)
                cases.append({
                    "name": f"fused_linear_{kname}_{vname}_{tag}_w{cfg.num_warps}"
                            f"_s{cfg.num_stages}",
                    "fn": fn, "signature": sig,
                    "constexprs": {**dict.fromkeys(unit, 1), **extra, "PRECISION": precision,
                                   "UPCAST": False, **meta},
                    # Pointers from the caching allocator and sizes/strides that are multiples
                    # of 16: the case Triton specialises for the layer widths used in practice.
                    "divisible": [a for a in args if a != "slope"],
                    "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                    "gemm": not fma, "dtype": vname,
                })
        if vname == "tf32":
            continue
        cases.append({
            "name": f"fused_linear_bwd_dz_{vname}",
            "fn": _fused_linear_bwd_dz_kernel,
            "signature": {"g_ptr": ptr, "s_ptr": ptr, "dz_ptr": ptr, "M": "i32", "N": "i32",
                          "stride_gm": "i32", "slope": "fp32"},
            "constexprs": {"stride_gn": 1, "ACT": activation_id("gelu"), "FROM_Y": False,
                           "BLOCK_M": _DZ_BLOCK[0], "BLOCK_N": _DZ_BLOCK[1]},
            "divisible": ["g_ptr", "s_ptr", "dz_ptr", "N", "stride_gm"],
            "num_warps": 4, "num_stages": 1, "gemm": False, "dtype": vname,
        })
    return cases
