"""KL sparsity penalty of sparse autoencoders, fused: column means, KL sum and its gradient.

For sigmoid code activations h (B, H) and a target activation rho in (0, 1)::

    rho_hat_j = clamp(mean_b h[b, j], EPS, 1 - EPS)
    loss      = sum_j rho * log(rho / rho_hat_j) + (1 - rho) * log((1 - rho) / (1 - rho_hat_j))
    dloss/dh[b, j] = ((1 - rho) / (1 - rho_hat_j) - rho / rho_hat_j) / B   (0 where clamped)

The gradient is the same for every row, so the forward stores one coefficient per column and the
backward is a single elementwise broadcast pass. Forward: a split-row reduction kernel writes
partial column sums (enough programs to fill the GPU at any B), then one small program turns
them into the KL sum and the per-column coefficients in a fixed order (deterministic, no atomics).

Backends: the Triton path runs as the custom op ``aecore::kl_sparsity`` (opaque and
differentiable for torch.compile); the torch backend, any export, forward-mode AD and torch.func
transforms run :func:`kl_sparsity_reference`, plain differentiable torch math.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from aecore.kernels._backend import eager_cpu, exporting, interpreting, resolve, transformed

# rho_hat is clamped into [EPS, 1 - EPS] so that a dead (all-zero) or saturated (all-one) unit
# gives a finite loss (at most ~log(1/EPS) per unit) and a bounded gradient (<= 1 / (EPS * B)).
# 2**-20 (~9.5e-7) makes both bounds exact in fp32 as in fp64 (1 - 1e-6 would round by ~1%
# in fp32, and the KL of a saturated unit with it), so every precision clamps to the same values.
EPS = 2.0**-20


# --- Triton kernels ----------------------------------------------------------------------------

@triton.jit
def _kl_sparsity_colsum_kernel(h_ptr, partial_ptr, B, H, stride_b, stride_h, rows_per_prog,
                               BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """partial[split, j] = sum of h[b, j] over this program's rows (fp32)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    col_off = cols.to(tl.int64)[None, :] * stride_h
    acc = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    row0 = pid_r * rows_per_prog
    # rows_per_prog is a multiple of BLOCK_B, so no tile crosses into the next program's rows.
    for start in range(0, rows_per_prog, BLOCK_B):
        rows = row0 + start + tl.arange(0, BLOCK_B)
        mask = (rows < B)[:, None] & cmask[None, :]
        ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_b + col_off
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(partial_ptr + pid_r.to(tl.int64) * H + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _kl_sparsity_fwd_kernel(partial_ptr, out_ptr, coef_ptr, n_splits, B, H, rho, log_rho, omr,
                            log_omr, eps, BLOCK_H: tl.constexpr):
    """One program: column means from the partial sums, KL sum -> out, dloss/dh row -> coef.

    rho, log(rho), 1 - rho and log(1 - rho) come from the host (see ``_rho_terms``).
    """
    rho = tl.cast(rho, tl.float32)
    log_rho = tl.cast(log_rho, tl.float32)
    omr = tl.cast(omr, tl.float32)
    log_omr = tl.cast(log_omr, tl.float32)
    eps = tl.cast(eps, tl.float32)
    inv_b = 1.0 / tl.cast(B, tl.float32)
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for c0 in range(0, H, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        s = tl.zeros((BLOCK_H,), tl.float32)
        # splits * H stays far below 2**31 (splits <= 4 * SMs), so int32 offsets suffice here.
        for r in range(0, n_splits):
            s += tl.load(partial_ptr + r * H + cols, mask=cmask, other=0.0)
        mean = s * inv_b
        # Same convention as torch.clamp's gradient: the bounds themselves still pass it.
        inside = (mean >= eps) & (mean <= 1.0 - eps)
        rh = tl.clamp(mean, eps, 1.0 - eps, propagate_nan=tl.PropagateNan.ALL)
        # No log of rho here: rho that rounds to 0 in fp32 then adds 0, not 0 * log(0) = NaN.
        kl = rho * (log_rho - tl.log(rh)) + omr * (log_omr - tl.log(1.0 - rh))
        acc += tl.where(cmask, kl, 0.0)
        d = tl.where(inside, omr / (1.0 - rh) - rho / rh, 0.0) * inv_b
        tl.store(coef_ptr + cols, d, mask=cmask)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit
def _kl_sparsity_bwd_kernel(grad_ptr, coef_ptr, dh_ptr, B, H,
                            BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """dh[b, j] = grad * coef[j] for a (BLOCK_B, BLOCK_H) tile of the contiguous (B, H) dh."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_c * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    g = tl.load(grad_ptr)
    c = tl.load(coef_ptr + cols, mask=cmask, other=0.0) * g
    tile = tl.zeros((BLOCK_B, BLOCK_H), tl.float32) + c[None, :]
    mask = (rows < B)[:, None] & cmask[None, :]
    ptrs = dh_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(ptrs, tile.to(dh_ptr.dtype.element_ty), mask=mask)


# --- torch reference -----------------------------------------------------------------------------

def _rho_terms(rho: float) -> tuple[float, float, float, float]:
    """(rho, log rho, 1 - rho, log(1 - rho)) in float64 on the host.

    Computed in fp32, 1 - rho is 0 for rho within 2**-25 of 1 (then 0 * log 0 = NaN), and rho
    below ~1e-45 is 0 (the same NaN from rho * log(rho / rho_hat)); in float64 every rho in
    (0, 1) gives finite terms, which the fp32 math only multiplies and adds (a term whose
    factor rounds to 0 is 0, as it should be to fp32 precision).
    """
    return rho, math.log(rho), 1.0 - rho, math.log1p(-rho)


def _kl_terms(rho_hat: torch.Tensor, rho: float) -> torch.Tensor:
    """KL(rho || rho_hat) elementwise, rho_hat already clamped into [EPS, 1 - EPS]."""
    rho, log_rho, omr, log_omr = _rho_terms(rho)
    return rho * (log_rho - torch.log(rho_hat)) + omr * (log_omr - torch.log(1.0 - rho_hat))


def kl_sparsity_reference(h: torch.Tensor, rho: float, eps: float = EPS) -> torch.Tensor:
    """sum_j KL(rho || clamp(mean_b h[:, j])) for h (B, H): differentiable torch math -> scalar.

    Computed in fp32 (float64 stays float64), returned in h's dtype.
    """
    hf = h if h.dtype == torch.float64 else h.float()
    rho_hat = hf.mean(dim=0).clamp(eps, 1.0 - eps)
    return _kl_terms(rho_hat, rho).sum().to(h.dtype)


def _reference_fwd(h: torch.Tensor, rho: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, coef) of the reference path; coef (H,) is dloss/dh for every row."""
    hf = h if h.dtype == torch.float64 else h.float()
    mean = hf.mean(dim=0)
    inside = (mean >= eps) & (mean <= 1.0 - eps)
    rh = mean.clamp(eps, 1.0 - eps)
    kl = _kl_terms(rh, rho)
    coef = torch.where(inside, (1.0 - rho) / (1.0 - rh) - rho / rh, torch.zeros_like(rh))
    return kl.sum().to(h.dtype), coef / h.shape[0]


# --- launchers -----------------------------------------------------------------------------------

def _blocks(h_cols: int) -> tuple[int, int]:
    block_h = min(128, triton.next_power_of_2(max(h_cols, 1)))
    return 32, block_h


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter runs programs one after another: few, large ones are fastest.
    return 2


def _launch_fwd(h: torch.Tensor, rho: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H = h.shape
    block_b, block_h = _blocks(H)
    n_col = triton.cdiv(H, block_h)
    row_blocks = triton.cdiv(B, block_b)
    # Enough programs to fill the device, but at least 4 row tiles each, so that the single
    # finishing program reads few partial rows (<= B / 128 per column).
    splits = max(1, min(triton.cdiv(row_blocks, 4), triton.cdiv(_target_programs(h.device), n_col)))
    rows_per_prog = triton.cdiv(row_blocks, splits) * block_b
    splits = triton.cdiv(B, rows_per_prog)
    partial = torch.empty((splits, H), device=h.device, dtype=torch.float32)
    _kl_sparsity_colsum_kernel[(splits, n_col)](
        h, partial, B, H, h.stride(0), h.stride(1), rows_per_prog,
        BLOCK_B=block_b, BLOCK_H=block_h,
    )
    out = torch.empty((), device=h.device, dtype=torch.float32)
    coef = torch.empty((H,), device=h.device, dtype=torch.float32)
    _kl_sparsity_fwd_kernel[(1,)](partial, out, coef, splits, B, H, *_rho_terms(rho), eps,
                                  BLOCK_H=block_h, num_warps=4)
    return out.to(h.dtype), coef


def _launch_bwd(grad: torch.Tensor, coef: torch.Tensor, batch: int,
                dtype: torch.dtype) -> torch.Tensor:
    H = coef.shape[0]
    # The interpreter's bf16 conversions are wrong (triton#11584): there, store fp32 and cast.
    store = torch.float32 if interpreting() and dtype == torch.bfloat16 else dtype
    dh = torch.empty((batch, H), device=coef.device, dtype=store)
    block_b, block_h = _blocks(H)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(H, block_h))
    _kl_sparsity_bwd_kernel[grid](grad.float().reshape(1), coef, dh, batch, H,
                                  BLOCK_B=block_b, BLOCK_H=block_h)
    return dh.to(dtype)


# --- custom ops ----------------------------------------------------------------------------------

@torch.library.custom_op("aecore::kl_sparsity", mutates_args=())
def _kl_sparsity_op(h: torch.Tensor, rho: float, eps: float,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss in h.dtype, coef (H,)): coef[j] = dloss/dh[b, j] for every row b."""
    if backend == "triton":
        return _launch_fwd(h, rho, eps)
    return _reference_fwd(h, rho, eps)


@_kl_sparsity_op.register_fake
def _(h, rho, eps, backend):
    coef_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    return h.new_empty(()), h.new_empty((h.shape[1],), dtype=coef_dtype)


@torch.library.custom_op("aecore::kl_sparsity_backward", mutates_args=())
def _kl_sparsity_bwd_op(grad: torch.Tensor, coef: torch.Tensor, batch: int,
                        dtype: torch.dtype, backend: str) -> torch.Tensor:
    """dh (batch, H) in ``dtype``: grad * coef broadcast over the rows."""
    if backend == "triton":
        return _launch_bwd(grad, coef, batch, dtype)
    return (grad.to(coef.dtype) * coef).expand(batch, -1).to(dtype).contiguous()


@_kl_sparsity_bwd_op.register_fake
def _(grad, coef, batch, dtype, backend):
    return coef.new_empty((batch, coef.shape[0]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    h, _rho, _eps, backend = inputs
    ctx.save_for_backward(output[1])
    ctx.batch, ctx.dtype, ctx.backend = h.shape[0], h.dtype, backend


def _backward(ctx, grad_loss, _grad_coef):
    (coef,) = ctx.saved_tensors
    dh = _kl_sparsity_bwd_op(grad_loss, coef, ctx.batch, ctx.dtype, ctx.backend)
    return dh, None, None, None


_kl_sparsity_op.register_autograd(_backward, setup_context=_setup_context)


# --- public function -----------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _validate(h: object, rho: object) -> None:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in _DTYPES:
        raise TypeError(f"h must be a float32, float16, bfloat16 or float64 tensor (sigmoid "
                        f"activations), got {h.dtype}")
    if h.dim() != 2:
        raise ValueError(f"h must be 2-D (batch, hidden), got shape {tuple(h.shape)}")
    if h.shape[0] < 1 or h.shape[1] < 1:
        raise ValueError(f"h must have at least one row and one column, got shape "
                         f"{tuple(h.shape)}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"rho must be a float in (0, 1), got {type(rho).__name__}")
    if not (math.isfinite(rho) and 0.0 < rho < 1.0):
        raise ValueError(f"rho must be in the open interval (0, 1), got {rho!r}")


def kl_sparsity(h: torch.Tensor, rho: float, *, backend: str | None = None) -> torch.Tensor:
    """KL sparsity penalty: sum_j KL(rho || rho_hat_j), rho_hat_j = mean_b h[b, j] -> scalar.

    h: (B, H) sigmoid activations (float32/16, bfloat16; float64 on the torch backend),
    any strides; values must lie in [0, 1], which is not checked (a pass over h on every
    training step). rho: target mean activation in (0, 1). rho_hat is clamped into
    [EPS, 1 - EPS], where the penalty has no gradient: codes of an unbounded activation (relu)
    whose means leave [0, 1] get none. Differentiable in h; the result has h's dtype.
    """
    if (backend is None and type(rho) is float and 0.0 < rho < 1.0
            and isinstance(h, torch.Tensor) and h.dtype in _DTYPES and h.dim() == 2
            and h.shape[0] and h.shape[1] and eager_cpu(h, h)):
        # The usual call (a CPU tensor in eager mode, no options), checked in one expression:
        # the general path's separate checks cost as much as the math at a code layer's size.
        return kl_sparsity_reference(h, rho)
    _validate(h, rho)
    which = "torch" if exporting() else resolve(backend, h)
    if which == "torch" or transformed(h):
        # Plain torch math is already visible to autograd, compile and export; skipping the
        # opaque op saves its dispatch, which dominates at the sizes a code layer has on CPU.
        # Forward-mode tangents and torch.func transforms (jvp, vmap, jacrev) need it too: the
        # custom op has no rules for them and would drop a tangent silently.
        return kl_sparsity_reference(h, float(rho))
    loss, _ = _kl_sparsity_op(h, float(rho), EPS, which)
    return loss


# --- ahead-of-time compile cases ------------------------------------------------------------------

_TL_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def aot_cases() -> list[dict]:
    """Every (kernel, config, dtype) this op launches on a GPU, for ``aecore.kernels.aot``.

    Cases describe the common launch as the JIT specialises it: contiguous h (its unit stride
    becomes a constant) and H, stride_b multiples of 16, which allows vector loads and stores.
    Launches use Triton's defaults: 4 warps, 3 stages.
    """
    block_b, block_h = _blocks(1024)
    cases = []
    for dt in _TL_DTYPES:
        cases.append({
            "name": f"kl_sparsity_colsum_{dt}",
            "fn": _kl_sparsity_colsum_kernel,
            "signature": {"h_ptr": f"*{dt}", "partial_ptr": "*fp32", "B": "i32", "H": "i32",
                          "stride_b": "i32", "stride_h": "constexpr", "rows_per_prog": "i32"},
            "constexprs": {"stride_h": 1, "BLOCK_B": block_b, "BLOCK_H": block_h},
            "divisible": ["h_ptr", "partial_ptr", "H", "stride_b"],
            "num_warps": 4, "num_stages": 3, "gemm": False, "dtype": dt,
        })
        cases.append({
            "name": f"kl_sparsity_bwd_{dt}",
            "fn": _kl_sparsity_bwd_kernel,
            "signature": {"grad_ptr": "*fp32", "coef_ptr": "*fp32", "dh_ptr": f"*{dt}",
                          "B": "i32", "H": "i32"},
            "constexprs": {"BLOCK_B": block_b, "BLOCK_H": block_h},
            "divisible": ["grad_ptr", "coef_ptr", "dh_ptr", "H"],
            "num_warps": 4, "num_stages": 3, "gemm": False, "dtype": dt,
        })
    cases.append({
        "name": "kl_sparsity_fwd_fp32",
        "fn": _kl_sparsity_fwd_kernel,
        "signature": {"partial_ptr": "*fp32", "out_ptr": "*fp32", "coef_ptr": "*fp32",
                      "n_splits": "i32", "B": "i32", "H": "i32", "rho": "fp32",
                      "log_rho": "fp32", "omr": "fp32", "log_omr": "fp32", "eps": "fp32"},
        "constexprs": {"BLOCK_H": block_h},
        "divisible": ["partial_ptr", "out_ptr", "coef_ptr", "H"],
        "num_warps": 4, "num_stages": 3, "gemm": False, "dtype": "fp32",
    })
    return cases
