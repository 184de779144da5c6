"""reparameterize (z and the KL term) on both backends against a float64 oracle, its noise
statistics and determinism, extremes, and what it saves for the backward."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from scipy import stats
from tolerances import assert_close

from aecore.kernels.reparameterize import (
    LOGVAR_MAX,
    LOGVAR_MIN,
    aot_cases,
    reparameterize,
    reparameterize_reference,
)

BACKENDS = ("torch", "triton")


def make(shape, dtype=torch.float32, seed=0, lv_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    lv = torch.randn(shape, generator=g, dtype=torch.float64) * lv_scale
    return mu.to(dtype), lv.to(dtype)


def noise(shape, seed, backend, dtype=torch.float32):
    """The op's eps for ``seed``: with mu = 0 and logvar = 0, z = 0 + 1 * eps exactly."""
    zeros = torch.zeros(shape, dtype=dtype)
    return reparameterize(zeros, zeros, seed=seed, backend=backend, return_kl=False)


def oracle(mu, lv, eps, grad_z, grad_kl):
    """float64 (z, kl, dmu, dlv): closed forms by autograd at the clamped logvar (whose
    gradient the op passes straight through to logvar)."""
    m = mu.detach().double().requires_grad_()
    lc = lv.detach().double().clamp(LOGVAR_MIN, LOGVAR_MAX).requires_grad_()
    var = torch.exp(lc)
    z = m + torch.sqrt(var) * eps.double()
    kl = 0.5 * (m.pow(2) + var - 1.0 - lc).sum(dim=-1)
    torch.autograd.backward([z, kl], [grad_z.double(), grad_kl.double()])
    return z.detach(), kl.detach(), m.grad, lc.grad


def run(mu, lv, backend, seed=11, grad_seed=5):
    """(z, kl, dmu, dlv, eps, grad_z, grad_kl) of the op for leaves mu, lv."""
    mu = mu.detach().requires_grad_()
    lv = lv.detach().requires_grad_()
    z, kl = reparameterize(mu, lv, seed=seed, backend=backend)
    g = torch.Generator().manual_seed(grad_seed)
    grad_z = torch.randn(z.shape, generator=g).to(z.dtype)
    grad_kl = torch.randn(kl.shape, generator=g).to(kl.dtype)
    torch.autograd.backward([z, kl], [grad_z, grad_kl])
    # float64 draws its own (float64) stream on the torch path; every other dtype the fp32 one.
    eps = noise(mu.shape, seed, backend, torch.float64 if mu.dtype == torch.float64
                else torch.float32)
    return z, kl, mu.grad, lv.grad, eps, grad_z, grad_kl


def check(mu, lv, backend, seed=11):
    z, kl, dmu, dlv, eps, gz, gkl = run(mu, lv, backend, seed)
    assert z.dtype == mu.dtype and z.shape == mu.shape
    kl_dtype = torch.float64 if mu.dtype == torch.float64 else torch.float32
    assert kl.dtype == kl_dtype and kl.shape == mu.shape[:-1]
    assert dmu.dtype == mu.dtype and dlv.dtype == mu.dtype
    ez, ekl, edmu, edlv = oracle(mu, lv, eps, gz, gkl)
    D = mu.shape[-1]
    scale = lambda t: max(1.0, float(t.abs().max())) if t.numel() else 1.0
    assert_close(z, ez, z.dtype, scale=scale(ez))
    # kl sums D terms of size up to max(mu^2, exp(lv), |lv|): atol relative to that sum.
    terms = (mu.double() ** 2 + lv.double().clamp(LOGVAR_MIN, LOGVAR_MAX).exp()
             + lv.double().clamp(LOGVAR_MIN, LOGVAR_MAX).abs() + 1)
    assert_close(kl, ekl, kl_dtype, k=D, scale=scale(terms.sum(-1)) if terms.numel() else 1.0)
    assert_close(dmu, edmu, mu.dtype, scale=scale(edmu))
    assert_close(dlv, edlv, mu.dtype, scale=scale(edlv))


# --- values and gradients against the oracle -----------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (17, 5), (3, 37, 29), (2, 200)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_oracle(backend, shape):
    # (2, 200) sweeps D in two chunks of 128 columns; (3, 37, 29) has a batch of two dims.
    check(*make(shape, lv_scale=2.0), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_match_their_contiguous_copies(backend):
    mu, lv = make((23, 9), seed=1)
    cases = {
        "transposed": (mu.t().contiguous().t(), lv.t().contiguous().t()),
        "strided": (torch.randn(23, 18)[:, ::2], lv),
        "stride0": (mu[:1].expand(23, 9), lv[:, :1].expand(23, 9)),
        "chunks": tuple(torch.cat([mu, lv], dim=1).chunk(2, dim=1)),  # a VAE head's halves
    }
    for name, (m, v) in cases.items():
        assert not (m.is_contiguous() and v.is_contiguous()), name
        z = reparameterize(m, v, seed=3, backend=backend, return_kl=False)
        zc = reparameterize(m.contiguous(), v.contiguous(), seed=3, backend=backend,
                            return_kl=False)
        assert torch.equal(z, zc), name  # eps follows the logical index, not the strides
        check(m, v, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(backend, dtype):
    check(*make((19, 13), dtype=dtype, seed=2), backend)


def test_float64_torch_path_and_gradcheck():
    check(*make((6, 7), dtype=torch.float64, seed=3), "torch")
    mu, lv = make((4, 3), dtype=torch.float64, seed=4)
    fn = lambda m, v: reparameterize(m, v, seed=9, backend="torch")
    assert torch.autograd.gradcheck(fn, (mu.requires_grad_(), lv.requires_grad_()))
    # The custom op (what torch.compile sees) with its torch implementation, too.
    op = lambda m, v: torch.ops.aecore.reparameterize(m, v, torch.tensor(9), False)
    assert torch.autograd.gradcheck(op, (mu, lv))
    # Only one output used at a time (the other gradient is None inside the backward).
    assert torch.autograd.gradcheck(lambda m, v: fn(m, v)[0], (mu, lv))
    assert torch.autograd.gradcheck(lambda m, v: fn(m, v)[1], (mu, lv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_output_alone(backend):
    # Each output's gradient alone, through the kernels' HAS_GZ / HAS_GKL paths.
    mu, lv = make((9, 6), seed=5)
    eps = noise(mu.shape, 4, backend)
    zero_z, zero_kl = torch.zeros(9, 6), torch.zeros(9)
    for which in ("z", "kl"):
        m, v = mu.clone().requires_grad_(), lv.clone().requires_grad_()
        z, kl = reparameterize(m, v, seed=4, backend=backend)
        (z.sum() if which == "z" else kl.sum()).backward()
        gz = torch.ones(9, 6) if which == "z" else zero_z
        gkl = torch.ones(9) if which == "kl" else zero_kl
        _, _, edmu, edlv = oracle(mu, lv, eps, gz, gkl)
        assert_close(m.grad, edmu, torch.float32, scale=float(edmu.abs().max()))
        assert_close(v.grad, edlv, torch.float32, scale=float(edlv.abs().max()))


def test_double_backward_raises_on_the_torch_path():
    # The eager torch path saves std without its graph: second derivatives would miss terms.
    mu, lv = (t.requires_grad_() for t in make((2, 3)))
    z, kl = reparameterize(mu, lv, seed=0, backend="torch")
    with pytest.raises(RuntimeError, match="reparameterize does not support double backward"):
        torch.autograd.grad(kl.sum() + z.pow(2).sum(), (mu, lv), create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_and_vmap_run_the_reference_math(backend):
    mu, lv = make((4, 3))
    tmu, tlv = make((4, 3), seed=1)
    (z, kl), (dz, dkl) = torch.func.jvp(
        lambda m, v: reparameterize(m, v, seed=7, backend=backend), (mu, lv), (tmu, tlv))
    # The noise is the torch path's for the seed (recovered from z itself: mu = 0, logvar = 0).
    eps = noise(mu.shape, 7, "torch")
    ref = torch.func.jvp(lambda m, v: reparameterize_reference(m, v, eps.double()),
                         (mu.double(), lv.double()), (tmu.double(), tlv.double()))
    for got, want in zip((z, kl, dz, dkl), (*ref[0], *ref[1])):
        assert_close(got, want, torch.float32, k=3, scale=max(1.0, float(want.abs().max())))
    # vmap follows torch's randomness setting, which refuses random ops by default.
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(lambda m, v: reparameterize(m, v, seed=7, backend=backend))(mu, lv)


def test_reference_with_explicit_noise():
    mu, lv = make((8, 5), seed=6, lv_scale=3.0)
    eps = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    z, kl = reparameterize_reference(mu, lv, eps)
    ez, ekl, _, _ = oracle(mu, lv, eps, torch.zeros(8, 5), torch.zeros(8))
    assert_close(z, ez, torch.float32, scale=float(ez.abs().max()))
    assert_close(kl, ekl, torch.float32, k=5, scale=float(ekl.abs().max()))
    # The torch backend's noise is this reference's eps drawn from the seed's first stream.
    from aecore.kernels.reparameterize import _stream_seed

    g = torch.Generator().manual_seed(_stream_seed(3, 0))
    eps3 = torch.randn(8, 5, generator=g)
    assert torch.equal(noise((8, 5), 3, "torch"), eps3)
    ref = reparameterize_reference(mu, lv, eps3)[0]
    assert_close(reparameterize(mu, lv, seed=3, backend="torch")[0], ref, torch.float32,
                 scale=float(ref.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    mu = torch.zeros(0, 4, requires_grad=True)
    z, kl = reparameterize(mu, torch.zeros(0, 4), seed=1, backend=backend)
    assert z.shape == (0, 4) and kl.shape == (0,)
    (z.sum() + kl.sum()).backward()
    assert mu.grad.shape == (0, 4)


# --- the noise -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_standard_normal(backend):
    eps = noise((64, 256), seed=2024, backend=backend).double().flatten()
    n = eps.numel()
    # 4 standard errors: at a fixed seed this either always passes or the stream is biased.
    assert abs(float(eps.mean())) < 4 / math.sqrt(n)
    assert abs(float(eps.var()) - 1) < 4 * math.sqrt(2 / n)
    assert stats.kstest(eps.numpy(), "norm").pvalue > 0.01
    # Third and fourth moments of a normal: 0 and 3.
    assert abs(float((eps ** 3).mean())) < 4 * math.sqrt(15 / n)
    assert abs(float((eps ** 4).mean()) - 3) < 4 * math.sqrt(96 / n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_and_seeds_give_uncorrelated_streams(backend):
    R, D = 32, 512
    eps = noise((R, D), seed=77, backend=backend).double()
    bound = 5 / math.sqrt(D)  # 5 standard errors of a correlation between independent rows
    corr = torch.corrcoef(eps)
    off = corr - torch.eye(R, dtype=torch.float64)
    assert float(off.abs().max()) < bound
    # Neighbouring columns too (a stream reused at an offset would show here).
    assert float((torch.corrcoef(eps.t()[:32]) - torch.eye(32, dtype=torch.float64))
                 .abs().max()) < 5 / math.sqrt(R)
    other = noise((R, D), seed=78, backend=backend).double()
    assert not torch.equal(eps, other)
    cross = torch.corrcoef(torch.cat([eps, other]))[:R, R:]
    assert float(cross.abs().max()) < bound


def test_triton_noise_is_a_function_of_seed_and_index():
    big = noise((8, 40), seed=5, backend="triton")
    assert torch.equal(noise((3, 40), seed=5, backend="triton"), big[:3])
    # Same flat index under a different shape: the same number.
    assert torch.equal(noise((16, 20), seed=5, backend="triton").reshape(8, 40), big)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_per_seed_generator_and_manual_seed(backend):
    mu, lv = make((11, 7), seed=7)
    z = lambda **kw: reparameterize(mu, lv, backend=backend, return_kl=False, **kw)
    assert torch.equal(z(seed=42), z(seed=42))
    assert not torch.equal(z(seed=42), z(seed=43))
    torch.manual_seed(123)
    a, b = z(), z()
    torch.manual_seed(123)
    assert torch.equal(z(), a) and torch.equal(z(), b)
    assert not torch.equal(a, b)  # each call draws a fresh seed
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    first = z(generator=g1)
    assert torch.equal(first, z(generator=g2))
    assert not torch.equal(first, z(generator=g1))  # the generator advanced


@pytest.mark.parametrize("grad", [True, False])
def test_usual_call_matches_the_general_path(monkeypatch, grad):
    # The usual call (CPU tensors, no options) takes a shorter path than calls with options or
    # with AECORE_BACKEND set; both draw the seed and compute alike.
    mu, lv = make((9, 6), seed=3)
    gz, gkl = torch.randn(9, 6), torch.randn(9)

    def run():
        m, v = mu.clone().requires_grad_(grad), lv.clone().requires_grad_(grad)
        torch.manual_seed(11)
        z, kl = reparameterize(m, v)
        if not grad:
            return z, kl
        torch.autograd.backward((z, kl), (gz, gkl))
        return z, kl, m.grad, v.grad

    usual = run()
    monkeypatch.setenv("AECORE_BACKEND", "torch")
    general = run()
    assert all(torch.equal(a, b) for a, b in zip(usual, general))
    assert usual[0].requires_grad == grad


def test_backends_use_different_streams():
    # Documented: both are deterministic per seed, but not bit-identical to each other.
    assert not torch.equal(noise((4, 8), 1, "torch"), noise((4, 8), 1, "triton"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_matches_monte_carlo(backend):
    # KL(q || p) = E_q[log q(z) - log p(z)], estimated from 20000 draws per row.
    mu0 = torch.tensor([[0.0, 0.0, 0.0], [1.5, -0.5, 0.2], [0.3, 0.1, -2.0]])
    lv0 = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.5, 0.0], [-3.0, 1.2, 0.4]])
    n = 20000
    mu, lv = mu0.repeat(n, 1), lv0.repeat(n, 1)
    z, kl = reparameterize(mu, lv, seed=31, backend=backend)
    zd, md, vd = z.double(), mu.double(), lv.double()
    log_q = -0.5 * (((zd - md) ** 2) / vd.exp() + vd + math.log(2 * math.pi)).sum(-1)
    log_p = -0.5 * (zd ** 2 + math.log(2 * math.pi)).sum(-1)
    sample = (log_q - log_p).reshape(n, 3)
    est, se = sample.mean(0), sample.std(0) / math.sqrt(n)
    closed = kl[:3].double()
    assert torch.all((est - closed).abs() < 5 * se + 1e-12), (est, closed, se)
    assert torch.equal(kl.reshape(n, 3), kl[:3].expand(n, 3))


# --- extremes -------------------------------------------------------------------------------------

EXTREMES = [-math.inf, -1e4, LOGVAR_MIN - 1, LOGVAR_MIN, 0.0, LOGVAR_MAX, LOGVAR_MAX + 1, 1e4,
            math.inf]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_extreme_logvar_is_finite_and_straight_through(backend, dtype):
    n = len(EXTREMES)
    lv = torch.tensor(EXTREMES).repeat(3, 1).to(dtype)  # (3, n): each row sees every value
    mu = torch.linspace(-2, 2, 3 * n).reshape(3, n).to(dtype)
    clamped = lv.float().clamp(LOGVAR_MIN, LOGVAR_MAX).to(dtype)
    outs = []
    for v in (lv, clamped):
        m, v = mu.clone().requires_grad_(), v.clone().requires_grad_()
        z, kl = reparameterize(m, v, seed=8, backend=backend)
        torch.autograd.backward([z, kl], [torch.ones_like(z), torch.ones_like(kl)])
        outs.append((z, kl, m.grad, v.grad))
    for t in outs[0]:
        assert torch.isfinite(t).all(), t
    # Values beyond the range behave exactly as the bound, gradients included.
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)
    # The KL gradient pulls an out-of-range logvar back: dkl/dlv > 0 above, < 0 below.
    m, v = mu.clone().requires_grad_(), lv.clone().requires_grad_()
    reparameterize(m, v, seed=8, backend=backend)[1].sum().backward()
    assert (v.grad[:, lv[0].float() > LOGVAR_MAX] > 0).all()
    assert (v.grad[:, lv[0].float() < LOGVAR_MIN] < 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logvar_propagates(backend):
    lv = torch.tensor([[0.0, math.nan, 1.0]])
    z, kl = reparameterize(torch.zeros(1, 3), lv, seed=1, backend=backend)
    assert torch.isnan(z[0, 1]) and torch.isfinite(z[0, [0, 2]]).all()
    assert torch.isnan(kl).all()


# --- memory ---------------------------------------------------------------------------------------

def saved_bytes(fn, *args) -> tuple[int, set]:
    """Bytes autograd saves for the backward of fn(*args), one count per storage."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values()), set(seen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_two_tensors_and_no_noise(backend):
    mu, lv = (t.requires_grad_() for t in make((33, 16), seed=9))
    nbytes, ptrs = saved_bytes(lambda: reparameterize(mu, lv, seed=1, backend=backend))
    # Triton keeps mu and logvar; the eager torch path keeps mu and exp(logvar / 2), which its
    # forward computed anyway. Neither keeps eps.
    assert mu.untyped_storage().data_ptr() in ptrs and len(ptrs) == 2
    if backend == "triton":
        assert lv.untyped_storage().data_ptr() in ptrs
    assert nbytes == 2 * mu.numel() * mu.element_size()

    def eager(m, v):
        z = m + torch.exp(0.5 * v) * torch.randn_like(m)
        return z, -0.5 * torch.sum(1 + v - m.pow(2) - v.exp(), dim=-1)

    eager_bytes, _ = saved_bytes(eager, mu, lv)
    assert nbytes * 2 <= eager_bytes


# --- torch.compile, export, custom op checks ------------------------------------------------------

@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_opcheck(use_triton):
    mu, lv = make((5, 3), seed=10)
    torch.library.opcheck(torch.ops.aecore.reparameterize.default,
                          (mu.requires_grad_(), lv.requires_grad_(), torch.tensor(7), use_triton))
    gz, gkl = torch.randn(5, 3), torch.randn(5)
    torch.library.opcheck(torch.ops.aecore.reparameterize_backward.default,
                          (gz, gkl, mu.detach(), lv.detach(), torch.tensor(7), use_triton))
    torch.library.opcheck(torch.ops.aecore.reparameterize_backward.default,
                          (None, gkl, mu.detach(), lv.detach(), torch.tensor(7), use_triton))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_matches_eager(backend):
    mu, lv = make((6, 5), seed=11)

    def loss(m, v):
        z, kl = reparameterize(m, v, seed=13, backend=backend)
        return z.square().sum() + kl.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (compiled, loss):
        m, v = mu.clone().requires_grad_(), lv.clone().requires_grad_()
        out = fn(m, v)
        out.backward()
        grads.append((out.detach(), m.grad, v.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend, compiler", [("torch", "aot_eager"), ("torch", "inductor"),
                                               ("triton", "aot_eager")])
def test_compiled_default_seed_breaks_no_graph(backend, compiler):
    # Without a seed, the seed is drawn inside the graph (fullgraph=True raises on a break):
    # torch.manual_seed repeats z, another seed changes it, and the KL and gradients are those
    # of z = mu + exp(logvar / 2) * eps for the eps drawn.
    mu, lv = make((7, 5), seed=14)
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(lambda m, v: reparameterize(m, v, backend=backend),
                                 backend=compiler, fullgraph=True)
        runs = []
        for s in (3, 3, 4):
            torch.manual_seed(s)
            m, v = mu.clone().requires_grad_(), lv.clone().requires_grad_()
            z, kl = compiled(m, v)
            (z.square().sum() + kl.sum()).backward()
            runs.append((z.detach(), kl.detach(), m.grad, v.grad))
    first, again, other = runs
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    m, v = mu.double().requires_grad_(), lv.double().requires_grad_()
    eps = (first[0].double() - m.detach()) / torch.exp(0.5 * v.detach())
    z, kl = reparameterize_reference(m, v, eps)
    (z.square().sum() + kl.sum()).backward()
    for got, want in zip(first[1:], (kl, m.grad, v.grad)):
        assert_close(got, want.detach())


def test_torch_export_emits_reference_math():
    class Sampler(torch.nn.Module):
        def forward(self, mu, lv):
            return reparameterize(mu, lv)

    mu, lv = make((4, 3), seed=12)
    ep = torch.export.export(Sampler(), (mu, lv))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("aecore" in t for t in targets), targets
    assert any("randn" in t for t in targets), targets
    z, kl = ep.module()(mu, lv)
    torch.testing.assert_close(kl, reparameterize(mu, lv)[1])
    assert z.shape == mu.shape


# --- bad inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    ({"mu": [0.0]}, TypeError, "mu must be a torch.Tensor"),
    ({"logvar": torch.zeros(4, 3, dtype=torch.int64)}, TypeError, "logvar must be a floating"),
    ({"mu": torch.zeros(4, 3, dtype=torch.int32)}, TypeError, "mu must be a floating"),
    ({"logvar": torch.zeros(4, 2)}, ValueError, r"logvar must have the shape of mu \(4, 3\)"),
    ({"mu": torch.zeros(()), "logvar": torch.zeros(())}, ValueError, "mu must have at least"),
    ({"logvar": torch.zeros(4, 3, dtype=torch.float16)}, TypeError, "logvar must have the dtype"),
    ({"logvar": torch.zeros(4, 3, device="meta")}, ValueError, "logvar must be on the device"),
    ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*63 - 1\]"),
    ({"seed": 2**63}, ValueError, "seed must be in"),
    ({"seed": 1.0}, TypeError, "seed must be an int"),
    ({"seed": True}, TypeError, "seed must be an int"),
    ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
    ({"seed": 1, "generator": torch.Generator()}, ValueError, "seed or generator, not both"),
    ({"return_kl": 1}, TypeError, "return_kl must be a bool"),
    ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ({"mu": torch.zeros(4, 3, dtype=torch.float64),
      "logvar": torch.zeros(4, 3, dtype=torch.float64), "backend": "triton"},
     TypeError, "float64"),
])
def test_bad_inputs(kwargs, exc, match):
    args = {"mu": torch.zeros(4, 3), "logvar": torch.zeros(4, 3), **kwargs}
    mu, lv = args.pop("mu"), args.pop("logvar")
    with pytest.raises(exc, match=match):
        reparameterize(mu, lv, **args)


# --- ahead-of-time compile ------------------------------------------------------------------------

def test_aot_cases_describe_every_kernel_argument():
    cases = aot_cases()
    assert {c["name"] for c in cases} == {f"reparameterize_{k}_{d}" for k in ("fwd", "bwd")
                                          for d in ("fp32", "fp16", "bf16")}
    for c in cases:
        args = c["fn"].arg_names
        assert set(args) == set(c["signature"]) | set(c["constexprs"]), c["name"]
        assert set(c["divisible"]) <= set(c["signature"])


@pytest.mark.skipif(sys.platform != "linux", reason="the bundled ptxas runs on Linux only")
def test_kernels_compile_for_sm80_and_sm90_without_spills():
    pytest.importorskip("triton.backends.nvidia.compiler")
    # The compile needs TRITON_INTERPRET unset, so it runs in a fresh process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; from aecore.kernels import aot; "
            "json.dump(aot.compile_all(ops=('aecore.kernels.reparameterize',), jobs=2), "
            "sys.stdout)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert len(rows) == 2 * len(aot_cases())
    for r in rows:
        assert r["registers"] > 0 and r["spills"] == 0, r


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_differing_above_bit_31_draw_different_noise(backend):
    # CPU generators keep only a seed's low 32 bits; the op must still tell these apart.
    mu, lv = torch.zeros(4, 8), torch.zeros(4, 8)
    a = reparameterize(mu, lv, seed=5, backend=backend, return_kl=False)
    b = reparameterize(mu, lv, seed=5 + 2**32, backend=backend, return_kl=False)
    assert not torch.equal(a, b)


def test_torch_noise_streams_are_independent_and_thread_count_free():
    from aecore.kernels.reparameterize import MIN_STREAM, _torch_eps, stream_size

    assert stream_size(1) == stream_size(16 * MIN_STREAM) == MIN_STREAM
    assert stream_size(2**23) == 2**19  # at most 16 streams
    n = 2 * MIN_STREAM + 7
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = _torch_eps(torch.Size([n]), 11, torch.device("cpu"), torch.float32)
        torch.set_num_threads(2)
        parallel = _torch_eps(torch.Size([n]), 11, torch.device("cpu"), torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel)
    # The streams are not copies of each other, and the whole draw is standard normal.
    s0, s1 = serial[:MIN_STREAM], serial[MIN_STREAM:2 * MIN_STREAM]
    assert abs(torch.corrcoef(torch.stack([s0, s1]))[0, 1]) < 0.02
    assert abs(serial.mean()) < 0.01 and abs(serial.std() - 1) < 0.01


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_noise_streams_after_fork_do_not_hang():
    # A forked child inherits the parent's thread-pool object but not its threads; the noise
    # streams must still fill there. (torch's own OpenMP ops are not safe after a fork, which
    # is why DataLoader workers run one thread; the draw itself is.)
    code = ("import os, sys, torch\n"
            "from aecore.kernels.reparameterize import MIN_STREAM, _torch_eps\n"
            "torch.set_num_threads(2)\n"
            "draw = lambda: _torch_eps(torch.Size([4 * MIN_STREAM]), 1, torch.device('cpu'), "
            "torch.float32)\n"
            "parent = draw()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os._exit(0 if torch.equal(draw(), parent) else 3)\n"
            "sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n")
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == 0
