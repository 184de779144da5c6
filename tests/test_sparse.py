"""KL sparsity op (both backends) against a float64 oracle, and sparse autoencoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import rel_entr
from sklearn.datasets import load_digits
from tolerances import assert_close

from aecore.io import load_model, save_model
from aecore.kernels.sparsity import EPS, kl_sparsity, kl_sparsity_reference
from aecore.sparse import SparseAutoEncoder, l1_sparsity

BACKENDS = ("torch", "triton")


def oracle_loss(h: torch.Tensor, rho: float) -> float:
    """sum_j KL(Bernoulli(rho) || Bernoulli(clip(mean_j))) in float64 numpy."""
    mean = np.clip(h.detach().double().numpy().mean(axis=0), EPS, 1 - EPS)
    return float(np.sum(rel_entr(rho, mean) + rel_entr(1 - rho, 1 - mean)))


def oracle_grad(h: torch.Tensor, rho: float) -> torch.Tensor:
    """d loss / d h by float64 autograd through an independently written formula."""
    h64 = h.detach().double().requires_grad_()
    mean = torch.clamp(h64.sum(dim=0) / h64.shape[0], EPS, 1 - EPS)
    kl = torch.special.xlogy(rho, rho / mean) + torch.special.xlogy(1 - rho, (1 - rho) / (1 - mean))
    kl.sum().backward()
    return h64.grad


def _h(shape, dtype=torch.float32, seed=0, lo=0.01, hi=0.3):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)


def _check(h: torch.Tensor, rho: float, backend: str) -> None:
    h = h.detach().requires_grad_()
    loss = kl_sparsity(h, rho, backend=backend)
    loss.backward()
    B, H = h.shape
    assert loss.dtype == h.dtype and loss.shape == ()
    expected = oracle_loss(h, rho)
    assert_close(loss, torch.tensor(expected, dtype=torch.float64), h.dtype, k=B + H,
                 scale=max(1.0, abs(expected)))
    g = oracle_grad(h, rho)
    assert h.grad.dtype == h.dtype and h.grad.shape == h.shape
    assert_close(h.grad, g, h.dtype, k=B, scale=float(g.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
# (300, 50) splits the rows over two programs of five row tiles each (the last one partial).
@pytest.mark.parametrize("shape", [(1, 1), (37, 29), (130, 257), (300, 50)])
def test_kl_sparsity_matches_float64_oracle(backend, shape):
    _check(_h(shape), 0.05, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_sparsity_non_contiguous_and_stride_zero(backend):
    base = _h((29, 74), seed=1)
    _check(base.t(), 0.1, backend)  # (74, 29), column-major
    _check(base[:, ::2], 0.1, backend)  # (29, 37), stride 2 along the units
    _check(_h((1, 23), seed=2).expand(41, 23), 0.2, backend)  # stride 0 along the batch


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_sparsity_half_precision(backend, dtype):
    _check(_h((37, 29), dtype=dtype, seed=3), 0.05, backend)


def test_kl_sparsity_float64_gradcheck():
    h = _h((7, 5), dtype=torch.float64, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: kl_sparsity(t, 0.2, backend="torch"), (h,))
    _check(_h((37, 29), dtype=torch.float64), 0.05, "torch")


@pytest.mark.parametrize("backend", BACKENDS)
# 1 - 1e-8 is 1 in fp32 (1 - rho would be 0, the KL 0 * log 0); 1e-46 and 1e-300 are 0 there.
@pytest.mark.parametrize("rho", [1 - 1e-8, 1e-46, 1e-300])
def test_kl_sparsity_rho_at_the_edges_of_float32(backend, rho):
    _check(_h((37, 29), seed=10), rho, backend)
    _check(_h((9, 6), seed=11, lo=0.9, hi=1.0), rho, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_sparsity_forward_mode_and_torch_func(backend):
    # The custom op has no forward-mode rule: tangents must not be dropped or zeroed.
    h = _h((6, 5), seed=12)
    t = torch.randn(6, 5, generator=torch.Generator().manual_seed(13))
    g = oracle_grad(h, 0.1)
    expected = (g * t.double()).sum()
    scale = float((g.abs() * t.double().abs()).sum())

    def f(x):
        return kl_sparsity(x, 0.1, backend=backend)

    value, tangent = torch.func.jvp(f, (h,), (t,))
    assert_close(value, torch.tensor(oracle_loss(h, 0.1)), k=11, scale=float(value))
    assert_close(tangent, expected, k=30, scale=scale)
    with torch.autograd.forward_ad.dual_level():
        out = f(torch.autograd.forward_ad.make_dual(h, t))
        tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    assert tangent is not None
    assert_close(tangent, expected, k=30, scale=scale)
    assert_close(torch.func.jacrev(f)(h), g, k=6, scale=float(g.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_sparsity_clamps_dead_and_saturated_units(backend):
    h = _h((16, 6), seed=5)
    h[:, 1] = 0.0  # dead unit: rho_hat = 0 -> clamped to EPS
    h[:, 4] = 1.0  # saturated unit: rho_hat = 1 -> clamped to 1 - EPS
    h.requires_grad_()
    loss = kl_sparsity(h, 0.05, backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    expected = oracle_loss(h, 0.05)
    assert_close(loss, torch.tensor(expected, dtype=torch.float64), k=22, scale=expected)
    # torch.clamp's convention: no gradient through a clamped mean.
    assert torch.all(h.grad[:, [1, 4]] == 0)
    assert torch.all(h.grad[:, [0, 2, 3, 5]] != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_sparsity_zero_at_target(backend):
    h = torch.full((9, 13), 0.25, requires_grad=True)
    loss = kl_sparsity(h, 0.25, backend=backend)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert float(h.grad.abs().max()) < 1e-6


def test_kl_sparsity_reference_is_the_same_math():
    h = _h((37, 29), dtype=torch.float64, seed=6)
    assert abs(float(kl_sparsity_reference(h, 0.05)) - oracle_loss(h, 0.05)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_usual_call_matches_the_general_path(monkeypatch, dtype):
    # The usual call (a CPU tensor, no options) skips the general path's separate checks;
    # forcing that path (AECORE_BACKEND=torch) must give the same value and gradient.
    h0 = _h((40, 23), dtype=dtype, seed=9).t().contiguous().t()  # column-major

    def run():
        h = h0.clone().requires_grad_()
        loss = kl_sparsity(h, 0.05)
        loss.backward()
        return loss, h.grad

    usual = run()
    monkeypatch.setenv("AECORE_BACKEND", "torch")
    general = run()
    assert all(torch.equal(a, e) for a, e in zip(usual, general))
    assert abs(float(usual[0]) - oracle_loss(h0.double(), 0.05)) < 1e-3 * float(usual[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kl_sparsity_op_against_oracle(backend, dtype):
    # The custom op itself (the public function on CPU runs the plain reference for "torch").
    h = _h((37, 29), dtype=dtype, seed=9).requires_grad_()
    loss, coef = torch.ops.aecore.kl_sparsity(h, 0.05, EPS, backend)
    loss.backward()
    expected = oracle_loss(h, 0.05)
    assert_close(loss, torch.tensor(expected, dtype=torch.float64), dtype, k=66, scale=expected)
    g = oracle_grad(h, 0.05)
    assert_close(h.grad, g, dtype, k=37, scale=float(g.abs().max()))
    assert_close(coef, g[0], torch.float32, k=37, scale=float(g.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_sparsity_opcheck(backend):
    h = _h((9, 5), seed=7).requires_grad_()
    torch.library.opcheck(torch.ops.aecore.kl_sparsity.default, (h, 0.05, EPS, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_sparsity_compiles_and_exports(backend):
    h = _h((12, 7), seed=8)

    def f(t):
        return kl_sparsity(t, 0.05, backend=backend) * 2.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a = h.clone().requires_grad_()
    b = h.clone().requires_grad_()
    f(a).backward()
    compiled(b).backward()
    torch.testing.assert_close(b.grad, a.grad)

    class M(torch.nn.Module):
        def forward(self, t):
            return f(t)

    prog = torch.export.export(M(), (h,))
    assert "aecore" not in str(prog.graph)  # exporting emits the reference math, any backend
    torch.testing.assert_close(prog.module()(h), f(h))


@pytest.mark.parametrize("rho", [0.0, 1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_kl_sparsity_rejects_rho_outside_open_interval(rho):
    with pytest.raises(ValueError, match=r"rho must be in the open interval \(0, 1\)"):
        kl_sparsity(torch.rand(4, 3), rho)


@pytest.mark.parametrize("rho", [True, "0.05", torch.tensor(0.05), None])
def test_kl_sparsity_rejects_rho_of_wrong_type(rho):
    with pytest.raises(TypeError, match="rho must be a float"):
        kl_sparsity(torch.rand(4, 3), rho)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_sparsity_nan_in_nan_out(backend):
    h = _h((6, 4), seed=5)
    h[2, 1] = float("nan")
    assert kl_sparsity(h, 0.05, backend=backend).isnan()


def test_kl_sparsity_rejects_bad_h():
    with pytest.raises(TypeError, match="h must be a torch.Tensor, got list"):
        kl_sparsity([[0.1, 0.2]], 0.05)
    with pytest.raises(TypeError, match="h must be a float32, .*got torch.int64"):
        kl_sparsity(torch.ones(3, 2, dtype=torch.int64), 0.05)
    with pytest.raises(TypeError, match="h must be a float32, .*got torch.float8_e4m3fn"):
        kl_sparsity(torch.rand(3, 2).to(torch.float8_e4m3fn), 0.05)
    with pytest.raises(ValueError, match=r"h must be 2-D \(batch, hidden\), got shape \(5,\)"):
        kl_sparsity(torch.rand(5), 0.05)
    with pytest.raises(ValueError, match=r"h must be 2-D .* got shape \(2, 3, 4\)"):
        kl_sparsity(torch.rand(2, 3, 4), 0.05)
    with pytest.raises(ValueError, match=r"h must have at least one row .* \(0, 4\)"):
        kl_sparsity(torch.rand(0, 4), 0.05)
    with pytest.raises(ValueError, match="backend must be one of"):
        kl_sparsity(torch.rand(3, 2), 0.05, backend="cuda")
    with pytest.raises(TypeError, match="use backend='torch' for float64"):
        kl_sparsity(torch.rand(3, 2, dtype=torch.float64), 0.05, backend="triton")


# --- L1 term and the sparse autoencoder ---------------------------------------------------------

def test_l1_sparsity_formula():
    h = torch.randn(13, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = np.abs(h.numpy()).sum(axis=1).mean()
    assert abs(float(l1_sparsity(h)) - expected) < 1e-12
    for bad in (torch.ones(2, 3, 4), torch.ones(5)):  # would sum one axis of a code, or fail
        with pytest.raises(ValueError, match=r"h must be a 2-D tensor \(batch, hidden\)"):
            l1_sparsity(bad)
    with pytest.raises(TypeError, match="h must be a torch.Tensor, got list"):
        l1_sparsity([[1.0]])


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.from_numpy(load_digits().data[:512].astype(np.float32) / 16.0)


def _train(model, x, steps, lr=1e-2, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        xb = x[torch.randint(len(x), (128,), generator=g)]
        loss = model.loss(xb)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _sparse(seed=0, **kw):
    torch.manual_seed(seed)
    return SparseAutoEncoder(64, hidden_dims=(48,), **kw)


def test_kl_sparse_autoencoder_moves_code_activation_toward_rho(digits):
    rho = 0.05
    sparse = _sparse(latent_dim=96, sparsity="kl", rho=rho)  # over-complete: 96 > 64
    plain = _sparse(latent_dim=96, sparsity="kl", weight=0.0, rho=rho)
    with torch.no_grad():
        start = float(sparse.encode(digits).mean())
    _train(sparse, digits, 200)
    _train(plain, digits, 200)
    with torch.no_grad():
        end = float(sparse.encode(digits).mean())
        free = float(plain.encode(digits).mean())
        mse = float(sparse.loss(digits)["mse"])
    assert abs(end - rho) < 0.1 * abs(start - rho), (start, end)
    assert abs(end - rho) < 0.1 * abs(free - rho), (free, end)
    assert mse < 0.6 * float(digits.var(dim=0).mean())  # sparse, yet still reconstructs


def test_l1_sparse_autoencoder_lowers_code_norm(digits):
    sparse = _train(_sparse(latent_dim=96, sparsity="l1"), digits, 200)
    plain = _train(_sparse(latent_dim=96, sparsity="l1", weight=0.0), digits, 200)
    with torch.no_grad():
        l1_sparse = float(l1_sparsity(sparse.encode(digits)))
        l1_plain = float(l1_sparsity(plain.encode(digits)))
        mse = float(sparse.loss(digits)["mse"])
    assert 0 < l1_sparse < 0.3 * l1_plain, (l1_sparse, l1_plain)
    assert mse < 0.5 * float(digits.var(dim=0).mean())


@pytest.mark.parametrize("sparsity", ["kl", "l1"])
def test_sparse_loss_terms(sparsity, digits):
    model = _sparse(latent_dim=20, sparsity=sparsity, weight=0.3, rho=0.1)
    x = digits[:33]
    target = digits[33:66]
    terms = model.loss(x, target=target)
    assert set(terms) == {"loss", "mse", "sparsity"}
    with torch.no_grad():
        h = model.encode(x)
        mse = (model.decode(h) - target).pow(2).mean()
        pen = oracle_loss(h, 0.1) if sparsity == "kl" else float(h.abs().sum(1).mean())
    assert torch.allclose(terms["mse"], mse)
    assert abs(float(terms["sparsity"].detach()) - pen) < 1e-5 * max(1.0, pen)
    assert torch.allclose(terms["loss"], terms["mse"] + 0.3 * terms["sparsity"])
    assert model.encoder.layers[-1].activation == ("sigmoid" if sparsity == "kl" else "relu")


def test_sparse_config_round_trip(tmp_path, digits):
    model = _sparse(latent_dim=80, sparsity="l1", weight=0.02, tied=True)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, SparseAutoEncoder) and loaded.family == "sparse-ae"
    assert loaded.config() == model.config()
    assert loaded.config()["sparsity"] == "l1" and loaded.config()["weight"] == 0.02
    with torch.no_grad():
        torch.testing.assert_close(loaded(digits[:5]), model.eval()(digits[:5]))


def test_sparse_autoencoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"sparsity must be one of \('kl', 'l1'\), got 'l2'"):
        SparseAutoEncoder(8, sparsity="l2")
    with pytest.raises(ValueError, match="latent_activation must be 'sigmoid' with sparsity='kl'"):
        SparseAutoEncoder(8, sparsity="kl", latent_activation="relu")
    with pytest.raises(ValueError, match=r"rho must be a number in \(0, 1\), got 0"):
        SparseAutoEncoder(8, rho=0)
    with pytest.raises(ValueError, match="weight must be a finite number >= 0, got -1"):
        SparseAutoEncoder(8, weight=-1)
    model = SparseAutoEncoder(8, hidden_dims=(4,), latent_dim=3)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 8\)"):
        model.loss(torch.rand(2, 9))
    with pytest.raises(ValueError, match="target must have the shape of x"):
        model.loss(torch.rand(2, 8), target=torch.rand(3, 8))


def test_aot_cases_describe_the_launched_kernels():
    from aecore.kernels import sparsity

    cases = sparsity.aot_cases()
    assert {c["fn"] for c in cases} == {sparsity._kl_sparsity_colsum_kernel,
                                        sparsity._kl_sparsity_fwd_kernel,
                                        sparsity._kl_sparsity_bwd_kernel}
    assert len({c["name"] for c in cases}) == len(cases)
    for c in cases:
        # Every kernel argument is either typed in the signature or a constexpr value.
        args = c["fn"].arg_names
        assert set(c["signature"]) | set(c["constexprs"]) == set(args), c["name"]
        assert [a for a in args if a in c["signature"]] == list(c["signature"]), c["name"]
        assert {k for k, v in c["signature"].items() if v == "constexpr"} <= set(c["constexprs"])
        assert all(c["signature"][a].startswith(("*", "i32")) for a in c["divisible"]), c["name"]


def test_loss_rejects_non_floating_targets():
    model = SparseAutoEncoder(4, hidden_dims=(3,), latent_dim=6, sparsity="l1")
    with pytest.raises(TypeError, match="target must be a floating point tensor"):
        model.loss(torch.rand(2, 4), target=torch.ones(2, 4, dtype=torch.long))
