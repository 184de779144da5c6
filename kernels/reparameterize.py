"""Reparameterized sampling of a diagonal Gaussian with its KL term to N(0, I), fused.

For mu, logvar of shape (..., D)::

    lv  = clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
    z   = mu + exp(lv / 2) * eps,                         eps ~ N(0, I) from ``seed``
    kl  = -1/2 * sum_d (1 + lv - mu^2 - exp(lv))          shape (...)

and the backward, from grad_z (..., D) and grad_kl (...)::

    dmu = grad_z + grad_kl * mu
    dlv = 1/2 * grad_z * exp(lv / 2) * eps + 1/2 * grad_kl * (exp(lv) - 1)

Noise. eps is a pure function of (seed, flat index of the element in mu's logical row-major
order; on the torch path also mu's size), so the backward regenerates it instead of saving it:
the op keeps two tensors of mu's size (mu and logvar; the eager torch path keeps exp(logvar / 2)
in place of logvar) and the seed, an int. The Triton path draws eps in-kernel with Philox
(``tl.randn(seed, index)``); the torch path fills streams of ``stream_size(n)`` elements with
``torch.randn``, each from a torch.Generator seeded with a 64-bit mix of ``seed`` and the
stream's index (in parallel threads on a CPU; see ``_torch_eps``). Both are deterministic per
seed, but they are different streams: the same seed gives different z on the two backends.
Without a seed, one is drawn from ``generator``, or from torch's default CPU generator, so
``torch.manual_seed`` makes runs repeatable.

Extremes. logvar is clamped into [LOGVAR_MIN, LOGVAR_MAX] = [-30, 10]: the upper bound keeps
z (std <= e^5 ~ 148, times |eps| <= 5.7), exp(lv) and both gradients finite in float16 as well;
the lower bound (std ~ 3e-7) is far below any useful posterior width. +-inf are clamped like
any other value; NaN propagates. The gradient is straight-through: dlv is the formula above
evaluated at the clamped lv and passed to logvar unchanged (unlike torch.clamp, which would
zero it outside), so a logvar pushed beyond the range still feels the KL term pulling it back.

Precision. fp16/bf16/fp32 inputs are computed in fp32 (float64 stays float64 on the torch
path); z and the gradients have the input dtype, kl is float32 (float64 for float64): a sum of
D terms each up to exp(LOGVAR_MAX) / 2 ~ 1.1e4 would overflow float16. The torch path sums
lv/2 - var/2 - mu^2/2 and adds -D/2 once (a pass fewer than summing 1 + lv - mu^2 - var, as
the Triton kernel and eager do), so its absolute error is that of D float32 terms of size ~1/2,
about 3e-8 * D. That is visible only in a KL near 0, a collapsed posterior: for mu, logvar
~1e-3 at D = 4096 (KL ~3e-3) the median relative error is 4% (eager's 0.1%); float64 inputs
give such a KL to full precision.

Backends: the Triton kernels run as the custom op ``aecore::reparameterize`` (opaque and
differentiable for torch.compile); eager CPU runs the same math through a lighter
``autograd.Function``. Under torch.compile a default seed is drawn inside the graph (a
``torch.randint`` on the default CPU generator, so ``torch.manual_seed`` repeats compiled runs
too) and reaches the op as a 0-d tensor: drawing it breaks no graph. Under torch.export / ONNX
export the op emits :func:`reparameterize_reference` with ``torch.randn_like`` noise (an
unseeded RandomNormalLike); under torch.func transforms and forward-mode AD it runs
:func:`reparameterize_reference` on the torch path's noise (torch.clamp's gradient there).
The torch path's backward is first order only: with ``create_graph=True`` it raises.
"""

from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

from aecore.kernels._backend import (
    eager_cpu,
    exporting,
    first_order_only,
    interpreting,
    resolve,
    transformed,
)

LOGVAR_MIN = -30.0
LOGVAR_MAX = 10.0
# Default seeds are drawn below 2**31 (draw_seed) so that the kernels' seed argument stays
# int32 (one compiled variant); explicit seeds may use the full non-negative int64 range.
SEED_MAX = 2**63 - 1


# --- Triton kernels ----------------------------------------------------------------------------

@triton.jit(do_not_specialize=["seed"])
def _reparameterize_fwd_kernel(mu_ptr, lv_ptr, z_ptr, kl_ptr, seed, R, D,
                               stride_mr, stride_md, stride_lr, stride_ld,
                               LV_MIN: tl.constexpr, LV_MAX: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_R rows of (R, D): z (contiguous (R, D)) and kl (R,), sweeping D in BLOCK_D chunks."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < R
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = rmask[:, None] & (cols < D)[None, :]
        mu = tl.load(mu_ptr + rows[:, None] * stride_mr + cols[None, :] * stride_md,
                     mask=mask, other=0.0).to(tl.float32)
        lv = tl.load(lv_ptr + rows[:, None] * stride_lr + cols[None, :] * stride_ld,
                     mask=mask, other=0.0).to(tl.float32)
        lv = tl.clamp(lv, LV_MIN, LV_MAX, propagate_nan=tl.PropagateNan.ALL)
        std = tl.exp(0.5 * lv)
        # The element's flat index in the logical (R, D) order is its Philox counter: unique per
        # element, independent of strides and of the block sizes, so the backward can redraw it.
        idx = rows[:, None] * D + cols[None, :]
        eps = tl.randn(seed, idx)
        z = mu + std * eps
        tl.store(z_ptr + idx, z.to(z_ptr.dtype.element_ty), mask=mask)
        term = (1.0 + lv) - std * std - mu * mu
        acc += tl.sum(tl.where(mask, term, 0.0), axis=1)
    tl.store(kl_ptr + rows, -0.5 * acc, mask=rmask)


@triton.jit(do_not_specialize=["seed"])
def _reparameterize_bwd_kernel(gz_ptr, gkl_ptr, mu_ptr, lv_ptr, dmu_ptr, dlv_ptr, seed, R, D,
                               stride_gr, stride_gd, stride_kr, stride_mr, stride_md,
                               stride_lr, stride_ld,
                               LV_MIN: tl.constexpr, LV_MAX: tl.constexpr,
                               HAS_GZ: tl.constexpr, HAS_GKL: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (BLOCK_R, BLOCK_D) tile of dmu and dlv (contiguous (R, D)), eps redrawn from seed."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    rmask = rows < R
    mask = rmask[:, None] & (cols < D)[None, :]
    lv = tl.load(lv_ptr + rows[:, None] * stride_lr + cols[None, :] * stride_ld,
                 mask=mask, other=0.0).to(tl.float32)
    lv = tl.clamp(lv, LV_MIN, LV_MAX, propagate_nan=tl.PropagateNan.ALL)
    std = tl.exp(0.5 * lv)
    idx = rows[:, None] * D + cols[None, :]
    dmu = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    dlv = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    if HAS_GZ:
        gz = tl.load(gz_ptr + rows[:, None] * stride_gr + cols[None, :] * stride_gd,
                     mask=mask, other=0.0).to(tl.float32)
        eps = tl.randn(seed, idx)
        dmu += gz
        dlv += 0.5 * gz * std * eps
    if HAS_GKL:
        gkl = tl.load(gkl_ptr + rows * stride_kr, mask=rmask, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + rows[:, None] * stride_mr + cols[None, :] * stride_md,
                     mask=mask, other=0.0).to(tl.float32)
        dmu += gkl[:, None] * mu
        dlv += 0.5 * gkl[:, None] * (std * std - 1.0)
    tl.store(dmu_ptr + idx, dmu.to(dmu_ptr.dtype.element_ty), mask=mask)
    tl.store(dlv_ptr + idx, dlv.to(dlv_ptr.dtype.element_ty), mask=mask)


# --- torch reference -----------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reparameterize_reference(mu: torch.Tensor, logvar: torch.Tensor,
                             eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, kl) for explicit noise: mu, logvar, eps (..., D) -> z (..., D) in mu's dtype and
    kl (...) in float32 (float64 for float64 mu).

    Plain differentiable torch math, fp32 compute for half inputs. Autograd through it gives
    torch.clamp's zero gradient where logvar is outside the clamp range; the op
    (:func:`reparameterize`) passes it straight through instead.
    """
    cd = _compute_dtype(mu.dtype)
    m, lv = mu.to(cd), logvar.to(cd).clamp(LOGVAR_MIN, LOGVAR_MAX)
    std = torch.exp(0.5 * lv)
    z = m + std * eps.to(cd)
    kl = -0.5 * torch.sum(1.0 + lv - m * m - std * std, dim=-1)
    return z.to(mu.dtype), kl


_LOCAL = threading.local()
# At small sizes each torch call costs mostly its Python argument parsing, and a Python float
# argument costs about 2 us more than a 0-d tensor (it is wrapped into one on every call). The
# constants are exact in every dtype, and 0-d CPU tensors join any device's and dtype's math.
_HALF = torch.tensor(0.5, dtype=torch.float32, device="cpu")
_NEG_HALF = torch.tensor(-0.5, dtype=torch.float32, device="cpu")


_MASK64 = 2**64 - 1
# torch.randn on a CPU is single-threaded; large draws split into independently seeded streams
# that threads fill in parallel. A stream's size depends on the draw's size only (never on the
# thread count): at least MIN_STREAM elements (smaller ones cost more in hand-offs than they
# save) and at most 16 streams a draw (the per-task cost at large sizes).
MIN_STREAM = 1 << 16


def stream_size(n: int) -> int:
    """Elements per noise stream for a draw of n elements."""
    return max(MIN_STREAM, 1 << ((n - 1) // 16).bit_length())


_POOLS: dict = {}  # process id -> thread pool


def _stream_seed(seed: int, stream: int) -> int:
    """A 64-bit mix (SplitMix64's finalizer) of (seed, stream). CPU generators (mt19937) keep
    only the low 32 bits of their seed: mixing first makes seeds that differ only above bit 31,
    and neighbouring streams, draw unrelated noise."""
    x = (seed + (stream + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1  # manual_seed takes [0, 2**63)


def _generator(device: torch.device) -> torch.Generator:
    # One generator per thread and device, reseeded on every call: creating one costs more
    # than the seeding, and per-thread objects keep concurrent calls from sharing a stream.
    try:
        gens = _LOCAL.generators
    except AttributeError:
        gens = _LOCAL.generators = {}
    g = gens.get(device)
    if g is None:
        g = gens[device] = torch.Generator(device=device)
    return g


def _fill_stream(out: torch.Tensor, seed: int, stream: int) -> None:
    g = _generator(out.device)
    g.manual_seed(_stream_seed(seed, stream))
    torch.randn(out.shape, generator=g, dtype=out.dtype, device=out.device, out=out)


def _torch_eps(shape: torch.Size, seed: int, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """The torch path's noise: streams of torch.randn (``stream_size``), each from a generator
    seeded with a mix of ``seed`` and the stream's index."""
    n = shape.numel()
    if device.type == "meta":  # shapes only: no generator, no values
        return torch.empty(shape, device=device, dtype=dtype)
    if n <= MIN_STREAM:  # one stream, straight into a new tensor
        g = _generator(device)
        g.manual_seed(_stream_seed(seed, 0))
        return torch.randn(shape, generator=g, device=device, dtype=dtype)
    eps = torch.empty(shape, device=device, dtype=dtype)
    chunks = eps.view(-1).split(stream_size(n))
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        for i, c in enumerate(chunks):
            _fill_stream(c, seed, i)
        return eps
    # One pool per process: a forked child (a DataLoader worker) inherits the parent's pool
    # object but not its threads, and would wait forever on it.
    pool = _POOLS.get(os.getpid())
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        pool = _POOLS[os.getpid()] = ThreadPoolExecutor(max_workers=threads - 1,
                                                        thread_name_prefix="aecore-eps")
    # The calling thread fills streams too, beside threads - 1 workers, all taking the next
    # stream from one iterator (next() on it is atomic under the GIL): no thread waits idle
    # for a hand-off. torch ops release the GIL, so the streams fill in parallel.
    streams = iter(range(len(chunks)))

    def fill() -> None:
        for i in streams:
            _fill_stream(chunks[i], seed, i)

    helpers = [pool.submit(fill) for _ in range(min(threads, len(chunks)) - 1)]
    fill()
    for h in helpers:
        h.result()
    return eps


def _half_logvar(lv: torch.Tensor) -> torch.Tensor:
    """clamp(lv) / 2, a new tensor (halving is exact, so clamping the half into the halved range
    is the same clamp)."""
    return torch.mul(lv, _HALF).clamp_(LOGVAR_MIN / 2, LOGVAR_MAX / 2)


def _torch_forward(mu: torch.Tensor, logvar: torch.Tensor,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, kl, std) without autograd, in as few full-size passes as torch allows: at small
    sizes each pass costs mostly its dispatch. std = exp(clamp(logvar) / 2) in the compute
    dtype is returned for the backward."""
    dtype = mu.dtype
    cd = _compute_dtype(dtype)
    eps = _torch_eps(mu.shape, seed, mu.device, cd)
    m, lv = (mu, logvar) if dtype == cd else (mu.to(cd), logvar.to(cd))
    half = _half_logvar(lv)  # a new tensor, which the KL sum then accumulates into
    std = half.exp()
    z = torch.addcmul(m, std, eps, out=eps)  # into eps's buffer: one allocation fewer
    # kl = -D/2 - sum(lv/2 - var/2 - mu^2/2): the "1" per element joins as one -D/2 per row.
    term = half.addcmul_(std, std, value=-0.5).addcmul_(m, m, value=-0.5)
    kl = torch.rsub(term.sum(-1), -0.5 * mu.shape[-1])
    return (z if dtype == cd else z.to(dtype)), kl, std


def _torch_backward(grad_z: torch.Tensor | None, grad_kl: torch.Tensor | None,
                    mu: torch.Tensor, std: torch.Tensor,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dmu, dlv) in mu's dtype from std = exp(clamp(logvar) / 2), straight through the clamp;
    None grads count as zero."""
    dtype, cd = mu.dtype, std.dtype
    if grad_z is None and grad_kl is None:
        zero = torch.zeros(mu.shape, dtype=dtype, device=mu.device)
        return zero, zero.clone()
    gz, m = grad_z, mu
    if dtype != cd:
        gz, m = grad_z.to(cd) if grad_z is not None else None, mu.to(cd)
    # dlv = 1/2 (gz * std * eps + gkl * (std^2 - 1)) = 1/2 (std * (gz * eps + gkl * std) - gkl)
    if grad_kl is None:
        # A copy: op outputs must not alias their inputs.
        dmu = gz.clone(memory_format=torch.contiguous_format)
        dlv = _torch_eps(mu.shape, seed, mu.device, cd).mul_(gz).mul_(std).mul_(0.5)
    else:
        g = (grad_kl if dtype == cd else grad_kl.to(cd)).unsqueeze(-1)
        if gz is None:
            dmu, t = g * m, g * std
        else:
            dmu = torch.addcmul(gz, g, m)
            t = _torch_eps(mu.shape, seed, mu.device, cd).mul_(gz).addcmul_(g, std)
        dlv = torch.addcmul(torch.mul(g, _NEG_HALF), t, std, value=0.5)
    # Fresh contiguous tensors already; only half inputs need the cast back.
    return (dmu, dlv) if dtype == cd else (dmu.to(dtype), dlv.to(dtype))


# --- launchers -----------------------------------------------------------------------------------

# Warps per program. The forward draws Philox normals for a 2048-element tile; with 4 warps
# (16 elements a thread) its fp32 variant spilled on sm_80/sm_90 (aot_cases, ptxas -v); 8 warps
# halve the per-thread work. The backward's tile fits 4 warps without spills.
FWD_WARPS = 8
BWD_WARPS = 4


def _blocks(D: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): 2048-element tiles, as many rows as fit beside a <= 128 column chunk."""
    block_d = min(128, triton.next_power_of_2(max(D, 1)))
    return max(1, 2048 // block_d), block_d


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    # The interpreter's bf16 conversions are wrong (triton#11584): there, store fp32 and cast.
    return torch.float32 if interpreting() and dtype == torch.bfloat16 else dtype


def _as_rows(t: torch.Tensor, R: int, D: int) -> torch.Tensor:
    """(..., D) -> (R, D), a view where strides allow (transposes, slices, stride 0)."""
    return t if t.dim() == 2 else t.reshape(R, D)


def _launch_fwd(mu: torch.Tensor, logvar: torch.Tensor,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    D = mu.shape[-1]
    R = mu.numel() // D if D else 0
    z = torch.empty(mu.shape, device=mu.device, dtype=_store_dtype(mu.dtype))
    kl = torch.zeros(mu.shape[:-1], device=mu.device, dtype=torch.float32)
    if R == 0 or D == 0:
        return z.to(mu.dtype), kl
    m2, l2 = _as_rows(mu, R, D), _as_rows(logvar, R, D)
    block_r, block_d = _blocks(D)
    _reparameterize_fwd_kernel[(triton.cdiv(R, block_r),)](
        m2, l2, z, kl, seed, R, D, m2.stride(0), m2.stride(1), l2.stride(0), l2.stride(1),
        LV_MIN=LOGVAR_MIN, LV_MAX=LOGVAR_MAX, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=FWD_WARPS,
    )
    return z.to(mu.dtype), kl


def _launch_bwd(grad_z: torch.Tensor | None, grad_kl: torch.Tensor | None, mu: torch.Tensor,
                logvar: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    D = mu.shape[-1]
    R = mu.numel() // D if D else 0
    store = _store_dtype(mu.dtype)
    dmu = torch.empty(mu.shape, device=mu.device, dtype=store)
    dlv = torch.empty(mu.shape, device=mu.device, dtype=store)
    if R == 0 or D == 0:
        return dmu.to(mu.dtype), dlv.to(mu.dtype)
    m2, l2 = _as_rows(mu, R, D), _as_rows(logvar, R, D)
    # Absent gradients: the kernel skips their terms; any tensor stands in for the pointer.
    g2 = _as_rows(grad_z.expand(mu.shape), R, D) if grad_z is not None else m2
    k1 = grad_kl.expand(mu.shape[:-1]).reshape(R) if grad_kl is not None else m2
    block_r, block_d = _blocks(D)
    grid = (triton.cdiv(R, block_r), triton.cdiv(D, block_d))
    _reparameterize_bwd_kernel[grid](
        g2, k1, m2, l2, dmu, dlv, seed, R, D,
        g2.stride(0), g2.stride(1), k1.stride(0) if grad_kl is not None else 0,
        m2.stride(0), m2.stride(1), l2.stride(0), l2.stride(1),
        LV_MIN=LOGVAR_MIN, LV_MAX=LOGVAR_MAX, HAS_GZ=grad_z is not None,
        HAS_GKL=grad_kl is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=BWD_WARPS,
    )
    return dmu.to(mu.dtype), dlv.to(mu.dtype)


# --- custom ops ----------------------------------------------------------------------------------

def _kl_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("aecore::reparameterize", mutates_args=())
def _reparameterize_op(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor,
                       use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (..., D) in mu's dtype, kl (...) in float32 / float64); seed a 0-d int64 CPU tensor
    (``_seed_tensor``)."""
    if use_triton:
        return _launch_fwd(mu, logvar, int(seed))
    return _torch_forward(mu, logvar, int(seed))[:2]


@_reparameterize_op.register_fake
def _(mu, logvar, seed, use_triton):
    return torch.empty_like(mu), mu.new_empty(mu.shape[:-1], dtype=_kl_dtype(mu.dtype))


@torch.library.custom_op("aecore::reparameterize_backward", mutates_args=())
def _reparameterize_backward_op(grad_z: torch.Tensor | None, grad_kl: torch.Tensor | None,
                                mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor,
                                use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dmu, dlogvar), contiguous, in mu's dtype."""
    if use_triton:
        return _launch_bwd(grad_z, grad_kl, mu, logvar, int(seed))
    std = _half_logvar(logvar.to(_compute_dtype(mu.dtype))).exp_()
    return _torch_backward(grad_z, grad_kl, mu, std, int(seed))


@_reparameterize_backward_op.register_fake
def _(grad_z, grad_kl, mu, logvar, seed, use_triton):
    return (torch.empty(mu.shape, dtype=mu.dtype, device=mu.device),
            torch.empty(mu.shape, dtype=mu.dtype, device=mu.device))


def _setup_context(ctx, inputs, output):
    mu, logvar, seed, use_triton = inputs
    # eps is never saved: the backward redraws it from the seed.
    ctx.save_for_backward(mu, logvar)
    ctx.set_materialize_grads(False)
    # The 0-d seed is kept as the eager path keeps its int (8 bytes, not a saved activation).
    ctx.seed, ctx.use_triton = seed, use_triton


def _backward(ctx, grad_z, grad_kl):
    mu, logvar = ctx.saved_tensors
    dmu, dlv = _reparameterize_backward_op(grad_z, grad_kl, mu, logvar, ctx.seed,
                                           ctx.use_triton)
    return dmu, dlv, None, None


_reparameterize_op.register_autograd(_backward, setup_context=_setup_context)


class _TorchReparameterize(torch.autograd.Function):
    """The torch backend in eager mode: the same forward/backward as the custom op's torch
    path, without the op's dispatch layers (a Python autograd.Function costs far less). It
    keeps std = exp(clamp(logvar) / 2), which the forward computed anyway, in place of logvar:
    as many bytes (in the compute dtype), and the backward skips recomputing it."""

    @staticmethod
    def forward(ctx, mu, logvar, seed):
        z, kl, std = _torch_forward(mu, logvar, seed)
        ctx.save_for_backward(mu, std)
        ctx.set_materialize_grads(False)
        ctx.seed = seed
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        first_order_only("reparameterize")
        mu, std = ctx.saved_tensors
        dmu, dlv = _torch_backward(grad_z, grad_kl, mu, std, ctx.seed)
        return dmu, dlv, None


# Function.apply's Python layer only routes tensors that functorch transforms wrap (and unwraps
# dead wrappers); reparameterize sends those to the reference math before it gets here. Calling
# the C entry point directly saves about 10 us a call, a tenth of the op at 256 x 32.
_torch_apply = super(torch.autograd.Function, _TorchReparameterize).apply


# --- public function -----------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _validate(mu: object, logvar: object, seed: object, generator: object,
              return_kl: object) -> None:
    for name, t in (("mu", mu), ("logvar", logvar)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be a floating point tensor (float32, float16, "
                            f"bfloat16 or float64), got {t.dtype}")
    if mu.dim() < 1:
        raise ValueError("mu must have at least one dimension (..., latent_dim), got a 0-d "
                         "tensor")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have the shape of mu {tuple(mu.shape)}, "
                         f"got {tuple(logvar.shape)}")
    if logvar.dtype != mu.dtype:
        raise TypeError(f"logvar must have the dtype of mu ({mu.dtype}), got {logvar.dtype}")
    if logvar.device != mu.device:
        raise ValueError(f"logvar must be on the device of mu ({mu.device}), "
                         f"got {logvar.device}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not 0 <= seed <= SEED_MAX:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if not isinstance(return_kl, bool):
        raise TypeError(f"return_kl must be a bool, got {type(return_kl).__name__}")


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A seed in [0, 2**31) from ``generator``, or from torch's default CPU generator."""
    # random_() fills an int32 with [0, 2**31); a kept 0-d buffer per thread and device costs
    # half of a torch.randint call.
    try:
        buffers = _LOCAL.seed_buffers
    except AttributeError:
        buffers = _LOCAL.seed_buffers = {}
    if generator is None:  # the usual call: no keyword to parse
        buf = buffers.get(None)
        if buf is None:
            buf = buffers[None] = torch.empty((), dtype=torch.int32)
        return buf.random_().item()
    buf = buffers.get(generator.device)
    if buf is None:
        buf = buffers[generator.device] = torch.empty((), dtype=torch.int32,
                                                      device=generator.device)
    return buf.random_(generator=generator).item()


def _seed_tensor(seed: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """The custom op's seed, a 0-d int64 CPU tensor. Under torch.compile a default seed is
    drawn inside the graph (torch.randint on torch's default CPU generator, which
    torch.manual_seed sets as it sets draw_seed's), so drawing it breaks no graph: draw_seed's
    ``.item()`` would."""
    if seed is None:
        if generator is None and torch.compiler.is_compiling():
            return torch.randint(2**31, (), dtype=torch.int64)
        seed = draw_seed(generator)
    return torch.tensor(seed, dtype=torch.int64)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, seed: int | None = None,
                   generator: torch.Generator | None = None, return_kl: bool = True,
                   backend: str | None = None):
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I), and kl = KL(N(mu, exp(logvar)) || N(0, I)).

    mu, logvar: (..., D), same shape, dtype and device (float32/16, bfloat16; float64 on the
    torch backend), any strides. Returns ``(z, kl)``: z (..., D) in mu's dtype, kl (...) in
    float32 (float64 for float64); ``z`` alone with ``return_kl=False``. Differentiable in mu
    and logvar. eps comes from ``seed`` (an int; same seed, same z on a given backend) or is
    seeded from ``generator`` / torch's default generator. logvar is clamped into
    [LOGVAR_MIN, LOGVAR_MAX] with a straight-through gradient (see the module docstring).
    """
    if (seed is None and generator is None and backend is None and return_kl is True
            and isinstance(mu, torch.Tensor) and isinstance(logvar, torch.Tensor)
            and mu.dtype in _DTYPES and logvar.dtype == mu.dtype and mu.dim()
            and logvar.shape == mu.shape and eager_cpu(mu, logvar)):
        # The usual call (like CPU tensors in eager mode, no options), checked in one
        # expression: at 256 x 32 each microsecond here is half a percent of the op, and the
        # general path's checks cost about 10 us a call once other work has evicted them from
        # the caches (bench/bench_reparameterize.py's interleaving).
        seed = draw_seed()
        if torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad):
            return _torch_apply(mu, logvar, seed)
        return _torch_forward(mu, logvar, seed)[:2]
    _validate(mu, logvar, seed, generator, return_kl)
    compiling = torch.compiler.is_compiling()
    # Export traces through dynamo or the TorchScript tracer; checking those first keeps the
    # export test (microseconds) off the eager path.
    if (compiling or torch.jit.is_tracing()) and exporting():
        # Exported graphs sample with an unseeded RandomNormalLike; feed eps as an input
        # (reparameterize_reference) where exported results must be reproducible.
        cd = _compute_dtype(mu.dtype)
        z, kl = reparameterize_reference(mu, logvar, torch.randn_like(mu, dtype=cd))
        return (z, kl) if return_kl else z
    use_triton = resolve(backend, mu, logvar) == "triton"
    if transformed(mu, logvar):
        # torch.func transforms and forward-mode AD have no rules for the op: plain torch math
        # on the torch path's noise (under vmap, torch's randomness setting applies to it).
        cd = _compute_dtype(mu.dtype)
        seed = draw_seed(generator) if seed is None else seed
        z, kl = reparameterize_reference(mu, logvar, _torch_eps(mu.shape, seed, mu.device, cd))
        return (z, kl) if return_kl else z
    if use_triton or compiling:
        # One opaque differentiable node for torch.compile, whichever backend runs inside.
        z, kl = _reparameterize_op(mu, logvar, _seed_tensor(seed, generator), use_triton)
        return (z, kl) if return_kl else z
    seed = draw_seed(generator) if seed is None else seed
    if torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad):
        z, kl = _torch_apply(mu, logvar, seed)
    else:
        z, kl, _ = _torch_forward(mu, logvar, seed)
    return (z, kl) if return_kl else z


# --- ahead-of-time compile cases ------------------------------------------------------------------

_TL_DTYPES = ("fp32", "fp16", "bf16")


def aot_cases() -> list[dict]:
    """Every (kernel, dtype) this op launches on a GPU, for ``aecore.kernels.aot``.

    Cases describe the common launch as the JIT specialises it: contiguous inputs (unit column
    strides become constants), D and the row strides multiples of 16, an int32 seed (the drawn
    default; ``do_not_specialize`` keeps its value out of the key), both gradients present.
    """
    block_r, block_d = _blocks(128)
    common = {"LV_MIN": LOGVAR_MIN, "LV_MAX": LOGVAR_MAX, "BLOCK_R": block_r, "BLOCK_D": block_d}
    cases = []
    for dt in _TL_DTYPES:
        cases.append({
            "name": f"reparameterize_fwd_{dt}",
            "fn": _reparameterize_fwd_kernel,
            "signature": {"mu_ptr": f"*{dt}", "lv_ptr": f"*{dt}", "z_ptr": f"*{dt}",
                          "kl_ptr": "*fp32", "seed": "i32", "R": "i32", "D": "i32",
                          "stride_mr": "i32", "stride_lr": "i32"},
            "constexprs": {"stride_md": 1, "stride_ld": 1, **common},
            "divisible": ["mu_ptr", "lv_ptr", "z_ptr", "kl_ptr", "D", "stride_mr",
                          "stride_lr"],
            "num_warps": FWD_WARPS, "num_stages": 3, "gemm": False, "dtype": dt,
        })
        cases.append({
            "name": f"reparameterize_bwd_{dt}",
            "fn": _reparameterize_bwd_kernel,
            "signature": {"gz_ptr": f"*{dt}", "gkl_ptr": "*fp32", "mu_ptr": f"*{dt}",
                          "lv_ptr": f"*{dt}", "dmu_ptr": f"*{dt}", "dlv_ptr": f"*{dt}",
                          "seed": "i32", "R": "i32", "D": "i32", "stride_gr": "i32",
                          "stride_mr": "i32", "stride_lr": "i32"},
            "constexprs": {"stride_gd": 1, "stride_kr": 1, "stride_md": 1, "stride_ld": 1,
                           "HAS_GZ": True, "HAS_GKL": True, **common},
            "divisible": ["gz_ptr", "gkl_ptr", "mu_ptr", "lv_ptr", "dmu_ptr", "dlv_ptr", "D",
                          "stride_gr", "stride_mr", "stride_lr"],
            "num_warps": BWD_WARPS, "num_stages": 3, "gemm": False, "dtype": dt,
        })
    return cases
