"""Contractive penalty op (both backends) against vmap(jacrev) in float64, the Hutchinson
estimate, bad inputs, and contractive autoencoders trained on digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from sklearn.datasets import load_digits
from tolerances import assert_close

from aecore.autoencoder import AutoEncoder, Encoder
from aecore.contractive import DEFAULT_LAM, ContractiveAutoEncoder, contractive
from aecore.kernels import ACTIVATIONS
from aecore.kernels._activations import act_torch, activation_id
from aecore.kernels.contractive import (
    _act_grad2,
    contractive_penalty,
    contractive_penalty_reference,
    plan,
)
from aecore.registry import MODELS

BACKENDS = ("torch", "triton")
# (d, widths): depths 1-4; widths 1, 3, 17; d < h_1 (direct order) and d > h_1 (Gram order).
SHAPES = [
    (3, [17]), (17, [3]), (17, [1]),
    (5, [17, 3]), (17, [5, 3]),
    (3, [1, 17, 3]), (17, [3, 5, 1]),
    (6, [17, 3, 5, 2]),
]
BATCH = 5


def _encoder_fn(weights, biases, activations, slope):
    """The encoder as a plain per-sample function (the oracle's own forward)."""
    def f(v):
        for w, b, act in zip(weights, biases, activations):
            v = v @ w.t()
            if b is not None:
                v = v + b
            v = act_torch(v, act, slope)
        return v
    return f


def oracle(x, weights, biases, activations, slope=0.01):
    """||J||_F^2 per sample from the materialised Jacobian, torch.func.vmap(jacrev(f))."""
    J = torch.func.vmap(torch.func.jacrev(_encoder_fn(weights, biases, activations, slope)))(x)
    return J.pow(2).sum(dim=(1, 2))


def _problem(d, widths, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, d, generator=g, dtype=torch.float64)
    dims = [d, *widths]
    # Weights ~ 1/sqrt(fan_in) * 1.5 and biases of O(1), so every activation sees both sides
    # of its kink / curvature.
    ws = [torch.randn(o, i, generator=g, dtype=torch.float64) * (1.5 / math.sqrt(i))
          for i, o in zip(dims, dims[1:])]
    if bias is True:
        bs = [0.5 * torch.randn(o, generator=g, dtype=torch.float64) for o in widths]
    else:
        bs = [0.5 * torch.randn(o, generator=g, dtype=torch.float64) if keep else None
              for o, keep in zip(widths, bias)]
    return x, ws, bs


def _grads(fn, x, ws, bs):
    """(P, [dP.c/dx, dW..., db...]) with a fixed random cotangent c over the batch."""
    params = [x, *ws, *[b for b in bs if b is not None]]
    params = [p.detach().requires_grad_() for p in params]
    it = iter(params[1 + len(ws):])
    bs_ = [next(it) if b is not None else None for b in bs]
    P = fn(params[0], params[1:1 + len(ws)], bs_)
    c = torch.linspace(0.5, 1.5, P.shape[0], dtype=torch.float64).to(P.dtype)
    grads = torch.autograd.grad((P * c).sum(), params, allow_unused=True, materialize_grads=True)
    return P, grads


def _terms(d, widths):
    """Reduction length of the penalty: ||J||^2 sums, over the batch and the d * h_L Jacobian
    entries, one product per path through the hidden units, so B * d * h_1 * ... * h_L terms."""
    return BATCH * math.prod([d, *widths])


def _compare(d, widths, acts, backend, dtype, *, bias=True, slope=0.01, transform=None,
             bias_transform=None):
    x, ws, bs = _problem(d, widths, bias=bias)
    P0, g0 = _grads(lambda x_, w_, b_: oracle(x_, w_, b_, acts, slope), x, ws, bs)

    def ours(x_, w_, b_):
        x_, w_ = x_.to(dtype), [w.to(dtype) for w in w_]
        b_ = [None if b is None else b.to(dtype) for b in b_]
        if transform is not None:
            x_, w_ = transform(x_, w_)
        if bias_transform is not None:
            b_ = [None if b is None else bias_transform(b) for b in b_]
        return contractive_penalty(x_, w_, b_, acts, negative_slope=slope, backend=backend)

    P, g = _grads(ours, x, ws, bs)
    assert P.dtype == dtype and P.shape == (BATCH,)
    k = _terms(d, widths)
    assert_close(P.detach(), P0.detach(), dtype, k=k, scale=float(P0.detach().abs().max()))
    names = ["x"] + [f"W{i}" for i in range(len(ws))] + [f"b{i}" for i, b in enumerate(bs)
                                                          if b is not None]
    for name, a, e in zip(names, g, g0):
        assert a.shape == e.shape, name
        assert_close(a, e, dtype, k=k, scale=max(float(e.abs().max()), 1e-12))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{d}-{'-'.join(map(str, w))}" for d, w in SHAPES])
def test_torch_backend_matches_jacrev_float64(shape, activation):
    d, widths = shape
    _compare(d, widths, [activation] * len(widths), "torch", torch.float64)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{d}-{'-'.join(map(str, w))}" for d, w in SHAPES])
def test_triton_backend_matches_jacrev_float32(shape, activation):
    d, widths = shape
    _compare(d, widths, [activation] * len(widths), "triton", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_activations_leaky_slope_and_missing_biases(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    acts = ["leaky_relu", "gelu", "softplus", "tanh"]
    _compare(6, [17, 3, 5, 2], acts, backend, dtype, bias=[False, True, False, True], slope=0.2)
    _compare(17, [5, 3], ["silu", "sigmoid"], backend, dtype, bias=[False, False])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32

    def strided(x, ws):
        # x every other column of a wider buffer; weights as transposed views.
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        wide[:, ::2] = x
        ws = [w.t().contiguous().t() for w in ws]
        assert not wide[:, ::2].is_contiguous() and not ws[0].is_contiguous()
        return wide[:, ::2], ws

    _compare(17, [5, 3, 2], ["tanh", "relu", "sigmoid"], backend, dtype, transform=strided)
    _compare(3, [17], ["gelu"], backend, dtype, transform=strided)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, [17]), (17, [5, 3]), (3, [17, 3])],
                         ids=["closed", "gram", "direct"])
def test_strided_biases(backend, shape):
    dtype = torch.float64 if backend == "torch" else torch.float32

    def strided(b):
        # Every other element of a (h, 2) buffer whose other column is far off.
        b = torch.stack([b, torch.full_like(b, 100.0)], 1)[:, 0]
        assert b.stride() == (2,)
        return b

    d, widths = shape
    order = plan(BATCH, [d, *widths])
    assert order == {3: "direct", 17: "gram"}[d] if len(widths) > 1 else order == "closed"
    _compare(d, widths, ["tanh"] * len(widths), backend, dtype, bias_transform=strided)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    x, ws, bs = _problem(17, [5, 3])
    acts = ["tanh", "identity"]
    # The oracle sees the same rounded inputs the op sees.
    x, ws, bs = x.to(dtype).double(), [w.to(dtype).double() for w in ws], \
        [b.to(dtype).double() for b in bs]
    expected = oracle(x, ws, bs, acts)
    P = contractive_penalty(x.to(dtype), [w.to(dtype) for w in ws], [b.to(dtype) for b in bs],
                            acts, backend=backend)
    assert P.dtype == dtype
    assert_close(P, expected, dtype, k=BATCH * 25, scale=float(expected.abs().max()))


def test_reference_matches_jacrev():
    for d, widths in [(17, [5, 3]), (3, [17, 3, 2]), (4, [3])]:
        acts = ["silu"] * len(widths)
        x, ws, bs = _problem(d, widths)
        P0, g0 = _grads(lambda x_, w_, b_, a=acts: oracle(x_, w_, b_, a), x, ws, bs)
        P, g = _grads(lambda x_, w_, b_, a=acts: contractive_penalty_reference(x_, w_, b_, a),
                      x, ws, bs)
        k = _terms(d, widths)
        assert_close(P, P0, torch.float64, k=k, scale=float(P0.abs().max()))
        for a, e in zip(g, g0):
            assert_close(a, e, torch.float64, k=k, scale=float(e.abs().max()))


def test_plan_follows_the_cost_model():
    assert plan(256, [784, 1024]) == "closed"
    # d > h_1: the Gram matrix of W_1 contracts d once per batch.
    assert plan(256, [784, 512, 128, 32]) == "gram"
    assert plan(256, [784, 256, 64]) == "gram"
    # d < h_1: multiplying by W_1 directly is cheaper than a (h_1, h_1) quadratic form.
    assert plan(256, [16, 64, 8]) == "direct"
    assert plan(1, [5, 17, 3]) == "direct"


def test_custom_op_passes_opcheck():
    x, ws, bs = _problem(17, [5, 3])
    x = x.float().requires_grad_()
    ws = [w.float().requires_grad_() for w in ws]
    bs = [bs[0].float().requires_grad_()]
    ids = [ACTIVATIONS.index("tanh"), ACTIVATIONS.index("softplus")]
    torch.library.opcheck(torch.ops.aecore.contractive_penalty.default,
                          (x, ws, bs, [True, False], ids, 0.01, "gram", False, True))


def _fake_run(op, args):
    """The op's outputs under FakeTensorMode (its register_fake kernel) for real ``args``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    mode = FakeTensorMode()
    fake_args = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t,
                         args)
    with mode:
        return op(*fake_args)


@pytest.mark.parametrize("order", ["closed", "gram", "direct"])
def test_fake_kernels_match_the_real_ops(order):
    # Strided x, weights and biases, half precision: every output's shape, strides and dtype.
    widths = [5] if order == "closed" else [5, 3]
    x, ws, bs = _problem(17, widths)
    x = x.half().t().contiguous().t()
    ws = [w.half().t().contiguous().t() for w in ws]
    bs = [torch.stack([b, b], 1)[:, 0].half() for b in bs]
    ids = [ACTIVATIONS.index("tanh")] * len(ws)
    fwd = torch.ops.aecore.contractive_penalty.default
    bwd = torch.ops.aecore.contractive_penalty_backward.default
    for keep in (True, False):
        args = (x, ws, bs, [True] * len(ws), ids, 0.01, order, False, keep)
        runs = [(fwd(*args), _fake_run(fwd, args))]
        if keep:
            grad = torch.ones(BATCH, dtype=torch.float16)
            for needs_dx in (True, False):
                bargs = (grad, x, ws, bs, [True] * len(ws), ids, 0.01, order, False,
                         [grad, *runs[0][0][1:]], needs_dx)
                runs.append((bwd(*bargs), _fake_run(bwd, bargs)))
        for real, fake in runs:
            assert len(real) == len(fake)
            for i, (r, f) in enumerate(zip(real, fake)):
                assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), i


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weight_gradients_without_an_input_gradient(backend):
    # Training inputs need no gradient: the backward then skips dx, and the weights' and
    # biases' gradients are those of the run that computes it.
    x, ws, bs = _problem(17, [5, 3])
    x, ws, bs = x.float(), [w.float() for w in ws], [b.float() for b in bs]

    def grads(x_needs):
        xs = x.clone().requires_grad_(x_needs)
        leaves = [w.clone().requires_grad_() for w in ws] + [b.clone().requires_grad_()
                                                              for b in bs]
        p = contractive_penalty(xs, leaves[:2], leaves[2:], ["tanh", "relu"], backend=backend)
        p.sum().backward()
        return xs.grad, [t.grad for t in leaves]

    (dx, with_dx), (none, without) = grads(True), grads(False)
    assert dx is not None and none is None
    for a, b in zip(with_dx, without):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inductor_compile_with_non_contiguous_x():
    # Inductor asserts the strides the fake kernels promise (aot_eager does not).
    x, ws, bs = _problem(17, [5, 3])
    x = x.float().t().contiguous().t().requires_grad_()
    ws = [w.float().requires_grad_() for w in ws]
    bs = [b.float().requires_grad_() for b in bs]
    assert not x.is_contiguous()

    def f(x_, w0, w1, b0, b1):
        return contractive_penalty(x_, [w0, w1], [b0, b1], ["tanh", "sigmoid"]).sum()

    torch._dynamo.reset()
    # No cached graph: it would have been compiled against some other fake kernel.
    with torch._inductor.config.patch(force_disable_caches=True):
        out = torch.compile(f, backend="inductor", fullgraph=True)(x, *ws, *bs)
        grads = torch.autograd.grad(out, [x, *ws, *bs])
    expected = torch.autograd.grad(f(x, *ws, *bs), [x, *ws, *bs])
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("shape", [(3, [17]), (17, [5, 3]), (3, [17, 3])],
                         ids=["closed", "gram", "direct"])
def test_forward_mode_and_functorch_transforms(shape):
    # The op has no forward-mode rules: under these transforms the reference math runs.
    import torch.autograd.forward_ad as fwAD

    d, widths = shape
    x, ws, bs = _problem(d, widths)
    acts = ["tanh"] * (len(widths) - 1) + ["softplus"]
    ours = lambda x_: contractive_penalty(x_, ws, bs, acts)  # noqa: E731
    orc = lambda x_: oracle(x_, ws, bs, acts)  # noqa: E731
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k = _terms(d, widths)
    close = lambda a, e: assert_close(a, e, torch.float64, k=k,  # noqa: E731
                                      scale=float(e.abs().max()))
    P, jvp = torch.func.jvp(ours, (x,), (t,))
    P0, jvp0 = torch.func.jvp(orc, (x,), (t,))
    close(P, P0)
    assert jvp.abs().max() > 0
    close(jvp, jvp0)
    close(torch.func.jacfwd(ours)(x), torch.func.jacrev(orc)(x))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(ours(fwAD.make_dual(x, t))).tangent
    close(tangent, jvp0)
    # ... and w.r.t. a weight.
    tw = torch.ones_like(ws[0])
    close(torch.func.jvp(lambda w: contractive_penalty(x, [w, *ws[1:]], bs, acts), (ws[0],),
                         (tw,))[1],
          torch.func.jvp(lambda w: oracle(x, [w, *ws[1:]], bs, acts), (ws[0],), (tw,))[1])
    close(torch.func.vmap(lambda v: ours(v[None])[0])(x), P0)
    close(torch.func.grad(lambda v: ours(v).sum())(x), torch.func.grad(lambda v: orc(v).sum())(x))


def test_torch_compile_runs_the_op():
    x, ws, bs = _problem(17, [5, 3])
    fn = torch.compile(lambda x_, w_, b_: contractive_penalty(x_, w_, b_, ["tanh", "relu"]),
                       backend="aot_eager", fullgraph=True)
    assert_close(fn(x, ws, bs), oracle(x, ws, bs, ["tanh", "relu"]), torch.float64, k=100,
                 scale=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_cotangents(backend):
    # autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) batch the backward
    # with torch's older vmap: the same gradients as one cotangent at a time.
    dtype = torch.float64 if backend == "torch" else torch.float32
    x, ws, bs = _problem(17, [5, 3])
    bs[1] = None
    x, ws = x.to(dtype).requires_grad_(), [w.to(dtype).requires_grad_() for w in ws]
    bs = [None if b is None else b.to(dtype).requires_grad_() for b in bs]
    acts = ["tanh", "sigmoid"]
    leaves = [x, *ws, bs[0]]
    cots = torch.randn(3, BATCH, generator=torch.Generator().manual_seed(2), dtype=dtype)
    P = contractive_penalty(x, ws, bs, acts, backend=backend)
    batched = torch.autograd.grad(P, leaves, cots, is_grads_batched=True, retain_graph=True)
    for i, c in enumerate(cots):
        one = torch.autograd.grad(P, leaves, c, retain_graph=True)
        for a, e in zip(batched, one):
            torch.testing.assert_close(a[i], e)
    fn = lambda v: contractive_penalty(v, ws, bs, acts, backend=backend)  # noqa: E731
    torch.testing.assert_close(torch.autograd.functional.jacobian(fn, x, vectorize=True),
                               torch.autograd.functional.jacobian(fn, x))


def test_compiled_vmap_batches_the_op():
    # Under torch.compile the public function can't see the transform, so the op meets vmap
    # itself: its rule maps it over the batch.
    x, ws, bs = _problem(17, [5, 3])
    acts = ["tanh", "sigmoid"]
    per_sample = torch.func.vmap(lambda v: contractive_penalty(v[None], ws, bs, acts)[0])
    got = torch.compile(per_sample, backend="eager")(x)
    torch.testing.assert_close(got, contractive_penalty(x, ws, bs, acts))


def test_empty_batch():
    w = torch.randn(3, 4, requires_grad=True)
    P = contractive_penalty(torch.zeros(0, 4), [w], [None], ["tanh"])
    assert P.shape == (0,)
    P.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    # Gradients w.r.t. x and the biases too, also when no weight requires one.
    for widths in ([3], [3, 2]):
        x0 = torch.zeros(0, 4, requires_grad=True)
        ws = [torch.randn(3, 4), torch.randn(2, 3)][:len(widths)]
        bs = [torch.randn(h, requires_grad=True) for h in widths]
        P = contractive_penalty(x0, ws, bs, ["tanh"] * len(widths))
        assert P.shape == (0,) and P.dtype == x0.dtype
        grads = torch.autograd.grad(P.sum(), [x0, *bs])
        for g, t in zip(grads, [x0, *bs]):
            assert torch.equal(g, torch.zeros_like(t))


# --- bad inputs ----------------------------------------------------------------------------------

def _ok():
    return torch.randn(2, 4), [torch.randn(3, 4), torch.randn(2, 3)], [None, None], ["relu"] * 2


@pytest.mark.parametrize("change, exc, message", [
    (lambda a: {**a, "biases": [None]}, ValueError, "one entry per layer; got lengths 2, 1 and 2"),
    (lambda a: {**a, "activations": ["relu"]}, ValueError, "lengths 2, 2 and 1"),
    (lambda a: {**a, "weights": [torch.randn(3, 4), torch.randn(2, 5)]}, ValueError,
     r"weights\[1\] must have 3 input features \(weights\[0\].shape\[0\]\), got shape \(2, 5\)"),
    (lambda a: {**a, "weights": [torch.randn(3, 5), torch.randn(2, 3)]}, ValueError,
     r"weights\[0\] must have 4 input features \(x's feature count\)"),
    (lambda a: {**a, "weights": [torch.randn(3, 4, 1), torch.randn(2, 3)]}, ValueError,
     r"weights\[0\] must be 2-D"),
    (lambda a: {**a, "weights": []}, ValueError, "at least one layer"),
    (lambda a: {**a, "weights": torch.randn(3, 4)}, TypeError, "weights must be a list or tuple"),
    (lambda a: {**a, "activations": ["relu", "swish"]}, ValueError,
     r"activations\[1\] must be one of .*got 'swish'"),
    (lambda a: {**a, "x": torch.randn(2, 4, 1)}, ValueError, r"x must be 2-D \(batch, features\)"),
    (lambda a: {**a, "x": torch.randn(4)}, ValueError, "x must be 2-D"),
    (lambda a: {**a, "x": torch.ones(2, 4, dtype=torch.int64)}, TypeError,
     "x must be a float32, float16, bfloat16 or float64 tensor, got torch.int64"),
    (lambda a: {**a, "x": torch.ones(2, 4).to(torch.float8_e4m3fn)}, TypeError,
     "x must be a float32, .*got torch.float8_e4m3fn"),
    (lambda a: {**a, "x": [[0.0] * 4] * 2}, TypeError, "x must be a torch.Tensor, got list"),
    (lambda a: {**a, "weights": [torch.randn(3, 4).double(), torch.randn(2, 3)]}, TypeError,
     r"weights\[0\] must have x's dtype torch.float32, got torch.float64"),
    (lambda a: {**a, "biases": [torch.randn(4), None]}, ValueError,
     r"biases\[0\] must have shape \(3,\), got \(4,\)"),
    (lambda a: {**a, "biases": [3.0, None]}, TypeError,
     r"biases\[0\] must be a torch.Tensor or None"),
    (lambda a: {**a, "negative_slope": "0.1"}, TypeError, "negative_slope must be a real number"),
    (lambda a: {**a, "negative_slope": float("inf")}, ValueError,
     "negative_slope must be finite, got inf"),
])
def test_bad_inputs_raise(change, exc, message):
    x, ws, bs, acts = _ok()
    args = change({"x": x, "weights": ws, "biases": bs, "activations": acts})
    slope = args.pop("negative_slope", 0.01)
    with pytest.raises(exc, match=message):
        contractive_penalty(args["x"], args["weights"], args["biases"], args["activations"],
                            negative_slope=slope)


def test_bad_backend_raises():
    x, ws, bs, acts = _ok()
    with pytest.raises(ValueError, match="backend must be one of"):
        contractive_penalty(x, ws, bs, acts, backend="cuda")
    with pytest.raises(TypeError, match="use backend='torch' for float64"):
        contractive_penalty(x.double(), [w.double() for w in ws], bs, acts, backend="triton")


# --- aecore.losses.contractive -------------------------------------------------------------------

def _plain_from(encoder: Encoder):
    """The aecore Encoder's layers as a plain per-sample function of float64 copies."""
    layers = list(encoder.layers)
    return _encoder_fn([lay.weight.detach().double() for lay in layers],
                       [lay.bias.detach().double() for lay in layers],
                       [lay.activation for lay in layers], 0.01)


def test_exact_contractive_walks_the_encoder():
    torch.manual_seed(0)
    enc = Encoder(9, [7, 5], 3, activation="tanh", latent_activation="sigmoid")
    x = torch.randn(4, 9)
    P = contractive(enc, x)
    J = torch.func.vmap(torch.func.jacrev(_plain_from(enc)))(x.double())
    assert_close(P, J.pow(2).sum((1, 2)), torch.float32, k=4 * 24, scale=float(P.abs().max()))
    P.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_exact_contractive_rejects_other_encoders():
    seq = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    with pytest.raises(ValueError, match=r"method='exact' needs an aecore.autoencoder.Encoder.*"
                                         r"got Sequential; use method='hutchinson'"):
        contractive(seq, torch.randn(2, 4))
    enc = Encoder(4, [3], 2, activation="leaky_relu", latent_activation="leaky_relu")
    enc.layers[1].negative_slope = 0.3
    with pytest.raises(ValueError, match="one negative_slope across"):
        contractive(enc, torch.randn(2, 4))
    enc.layers[1].negative_slope = 0.01
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 4\) for this encoder"):
        contractive(enc, torch.randn(2, 5))
    with pytest.raises(ValueError, match="method must be one of"):
        contractive(enc, torch.randn(2, 4), method="sampled")
    with pytest.raises(ValueError, match="probes must be a positive integer, got 0"):
        contractive(seq, torch.randn(2, 4), method="hutchinson", probes=0)
    with pytest.raises(ValueError, match="distribution must be one of"):
        contractive(seq, torch.randn(2, 4), method="hutchinson", distribution="uniform")
    with pytest.raises(TypeError, match="x must be a floating point tensor"):
        contractive(seq, torch.ones(2, 4, dtype=torch.int32), method="hutchinson")
    # Options of the other method are checked too: a typo there must not pass unseen.
    with pytest.raises(ValueError, match="probes must be a positive integer, got -3"):
        contractive(enc, torch.randn(2, 4), probes=-3)
    with pytest.raises(ValueError, match="distribution must be one of"):
        contractive(enc, torch.randn(2, 4), distribution="bogus")
    with pytest.raises(ValueError, match="backend must be one of .* got 'no-such'"):
        contractive(seq, torch.randn(2, 4), method="hutchinson", backend="no-such")


def test_hutchinson_empty_batch():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x0 = torch.zeros(0, 6, requires_grad=True)
    est = contractive(enc, x0, method="hutchinson", probes=3)
    assert est.shape == (0,)
    params = [x0, *enc.parameters()]
    # The last bias is unused as for any batch (J does not depend on it); x is used.
    grads = torch.autograd.grad(est.sum(), params, allow_unused=True)
    assert grads[0] is not None and grads[1] is not None
    for g, t in zip(grads, params):
        assert g is None or torch.equal(g, torch.zeros_like(t))


def test_hutchinson_rejects_tuple_outputs_and_batch_statistics():
    class TupleEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc(x)
            return h, h.exp()

    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"encoder that returns a tensor \(B, \.\.\.\), got a "
                                        r"tuple of \['Tensor', 'Tensor'\]"):
        contractive(TupleEncoder(), x, method="hutchinson")
    bn = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match=r"batch-norm module '1' uses batch statistics.*"
                                         r"couple the samples; call encoder.eval\(\)"):
        contractive(bn, x, method="hutchinson")
    assert contractive(bn.eval(), x, method="hutchinson").shape == (2,)
    no_stats = torch.nn.Sequential(torch.nn.Linear(4, 3),
                                   torch.nn.BatchNorm1d(3, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="uses batch statistics"):
        contractive(no_stats, x, method="hutchinson")


class _ConvEncoder(torch.nn.Module):
    """A small conv encoder: (B, 1, 6, 6) -> (B, 3)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1, dtype=torch.float64)
        self.fc = torch.nn.Linear(2 * 3 * 3, 3, dtype=torch.float64)

    def forward(self, x):
        h = F.max_pool2d(torch.tanh(self.conv(x)), 2)
        return self.fc(h.flatten(-3))


def _exact_and_variance(f, x):
    """(||J||_F^2, variance of one Rademacher probe, of one Gaussian probe) per sample."""
    J = torch.func.vmap(torch.func.jacrev(f))(x)
    B = x.shape[0]
    J = J.reshape(B, -1, x[0].numel())
    M = J.transpose(1, 2) @ J                                  # (B, d, d) = J^T J
    fro2 = M.pow(2).sum((1, 2))
    diag2 = torch.diagonal(M, dim1=1, dim2=2).pow(2).sum(1)
    return J.pow(2).sum((1, 2)), 2 * (fro2 - diag2), 2 * fro2


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_hutchinson_converges_to_exact(kind, distribution):
    torch.manual_seed(0)
    if kind == "mlp":
        enc = torch.nn.Sequential(torch.nn.Linear(6, 5, dtype=torch.float64), torch.nn.Tanh(),
                                  torch.nn.Linear(5, 3, dtype=torch.float64))
        x = torch.randn(4, 6, dtype=torch.float64)
    else:
        enc = _ConvEncoder()
        x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    probes = 4000
    g = torch.Generator().manual_seed(1234)
    est = contractive(enc, x, method="hutchinson", probes=probes, generator=g,
                      distribution=distribution)
    with torch.no_grad():
        exact, var_rad, var_gauss = _exact_and_variance(enc, x)
    var = var_rad if distribution == "rademacher" else var_gauss
    # The mean of `probes` i.i.d. estimates has standard deviation sqrt(var / probes); with a
    # fixed seed, |error| < 4 sd per sample (a 6e-5 chance each under normality).
    sd = (var / probes).sqrt()
    z = (est.detach() - exact) / sd
    print(f"{kind}/{distribution}: exact {exact.tolist()}, z-scores {z.tolist()}")
    assert torch.all(sd > 0)
    assert torch.all(z.abs() < 4), z
    # Same seed, same probes: reproducible.
    again = contractive(enc, x, method="hutchinson", probes=probes,
                        generator=torch.Generator().manual_seed(1234), distribution=distribution)
    assert torch.equal(est, again)


def test_hutchinson_is_differentiable_with_the_probes_it_draws():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(6, 5, dtype=torch.float64), torch.nn.Softplus(),
                              torch.nn.Linear(5, 3, dtype=torch.float64))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    est = contractive(enc, x, method="hutchinson", probes=3,
                      generator=torch.Generator().manual_seed(7))
    params = [x, *enc.parameters()]
    grads = torch.autograd.grad(est.sum(), params, allow_unused=True, materialize_grads=True)
    # The same Rademacher probes (same generator and draw) applied to the jacrev Jacobian.
    v = torch.randint(0, 2, (12, 6), generator=torch.Generator().manual_seed(7)).double() * 2 - 1
    x2 = x.detach().requires_grad_()
    J = torch.func.vmap(torch.func.jacrev(enc))(x2)                   # (4, 3, 6)
    jv = torch.einsum("bod,pbd->pbo", J, v.view(3, 4, 6))
    ref = jv.pow(2).sum(-1).mean(0)
    assert_close(est, ref, torch.float64, k=30, scale=float(ref.abs().max()))
    ref_grads = torch.autograd.grad(ref.sum(), [x2, *enc.parameters()], allow_unused=True,
                                    materialize_grads=True)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, torch.float64, k=30, scale=float(e.abs().max()))


# --- contractive autoencoder ---------------------------------------------------------------------

def test_cae_registered_configurable_and_loss_terms():
    assert MODELS["cae"] is ContractiveAutoEncoder
    m = ContractiveAutoEncoder(10, [6], 3, lam=0.5, activation="tanh")
    assert m.config()["lam"] == 0.5 and m.lam == 0.5
    assert ContractiveAutoEncoder(10).lam == DEFAULT_LAM
    again = ContractiveAutoEncoder(**m.config())
    assert again.config() == m.config()
    x = torch.rand(4, 10)
    out = m.loss(x)
    assert set(out) == {"loss", "mse", "contractive"}
    expected_pen = contractive(m.encoder, x).mean()
    torch.testing.assert_close(out["contractive"], expected_pen)
    torch.testing.assert_close(out["loss"], out["mse"] + 0.5 * expected_pen)
    target = torch.rand(4, 10)
    torch.testing.assert_close(m.loss(x, target=target)["mse"], (m(x) - target).pow(2).mean())
    with pytest.raises(ValueError, match="lam must be a finite number >= 0, got -1"):
        ContractiveAutoEncoder(10, lam=-1)


def _train(model, X, steps=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (128,), generator=g)
        loss = model.loss(X[idx])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _code_motion(model, X, eps=0.05):
    """(mean ||f(x + n) - f(x)||, the same relative to the codes' spread) for n ~ N(0, eps^2)."""
    noise = torch.randn(X.shape, generator=torch.Generator().manual_seed(1)) * eps
    with torch.no_grad():
        z = model.encode(X)
        moved = (model.encode(X + noise) - z).norm(dim=1).mean()
        spread = (z - z.mean(0)).norm(dim=1).mean()
    return float(moved), float(moved / spread)


def test_cae_on_digits_lowers_both_terms_and_contracts_codes():
    X = torch.tensor(load_digits().data, dtype=torch.float32) / 16
    kw = {"input_dim": 64, "hidden_dims": [32], "latent_dim": 8, "output_activation": "sigmoid"}
    torch.manual_seed(0)
    ae = AutoEncoder(**kw)
    torch.manual_seed(0)
    cae = ContractiveAutoEncoder(**kw, lam=1e-2)   # same initial weights as ae
    torch.manual_seed(0)
    cae_default = ContractiveAutoEncoder(**kw)     # lam = DEFAULT_LAM
    with torch.no_grad():
        before = cae.loss(X)
    for model in (ae, cae, cae_default):
        _train(model, X)
    with torch.no_grad():
        after = cae.loss(X)
        ae_pen = contractive(ae.encoder, X).mean()
        default_pen = contractive(cae_default.encoder, X).mean()
    print(f"cae (lam 1e-2) mse {before['mse']:.4f} -> {after['mse']:.4f}, contractive "
          f"{before['contractive']:.4f} -> {after['contractive']:.4f}; contractive of ae "
          f"{ae_pen:.4f}, of cae (default lam) {default_pen:.4f}")
    assert after["mse"] < 0.5 * before["mse"]
    assert after["contractive"] < before["contractive"]
    # Unpenalised, the encoder's Jacobian grows as it learns; the default weight holds it down.
    assert default_pen < 0.1 * ae_pen
    ae_abs, ae_rel = _code_motion(ae, X)
    for name, model in (("lam 1e-2", cae), ("default lam", cae_default)):
        cae_abs, cae_rel = _code_motion(model, X)
        print(f"code motion cae ({name}) / ae: absolute {cae_abs / ae_abs:.3f}, relative to "
              f"the code spread {cae_rel / ae_rel:.3f}")
        assert cae_abs / ae_abs < 1
        # Also once the code's scale is factored out (a mere shrinking could be undone by
        # the decoder).
        assert cae_rel / ae_rel < 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_processed_in_chunks(backend, monkeypatch):
    # Chunks of 2 samples (5 = 2 + 2 + 1): chain products and their gradients per chunk.
    import aecore.kernels.contractive as op

    monkeypatch.setattr(op, "_chunk", lambda batch, r, widths, device: 2)
    dtype = torch.float64 if backend == "torch" else torch.float32
    _compare(17, [5, 3, 2], ["softplus", "tanh", "identity"], backend, dtype)
    _compare(3, [17, 3], ["gelu", "leaky_relu"], backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_gradient_by_upper_blocks(backend, monkeypatch):
    # dG accumulates its upper block triangle only, then mirrors it: blocks of 4 over h_1 = 17
    # (4 + 4 + 4 + 4 + 1, a ragged last block), in chunks of 2 samples. Depth 3 with relu
    # first (dA's row scale moves onto the chain's factors), with softplus first (the chain
    # needs dA itself), and depth 2 (no chain step).
    import aecore.kernels.contractive as op

    monkeypatch.setattr(op, "SYM_BLOCK", 4)
    monkeypatch.setattr(op, "_chunk", lambda batch, r, widths, device: 2)
    dtype = torch.float64 if backend == "torch" else torch.float32
    for widths, acts in (([17, 5, 3], ["relu", "relu", "identity"]),
                         ([17, 5, 3], ["softplus", "tanh", "sigmoid"]),
                         ([17, 3], ["leaky_relu", "tanh"])):
        assert plan(BATCH, [80, *widths]) == "gram"
        _compare(80, widths, acts, backend, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hutchinson_through_aecore_encoder_matches_exact(dtype):
    """Forward-mode JVPs run through FusedLinear (its reference math under torch.func).

    Rademacher probes: Var(v^T A v) <= 2 ||A||_F^2 <= 2 tr(A)^2 with A = J^T J, so the relative
    standard error of the mean over 4000 probes is at most sqrt(2 / 4000) = 2.2%; 12% is over
    5 standard errors, plus fp16 rounding."""
    from aecore.autoencoder import Encoder
    from aecore.contractive import contractive

    torch.manual_seed(0)
    enc = Encoder(10, [7], 3, activation="tanh").to(dtype)
    x = torch.randn(4, 10, dtype=dtype)
    exact = contractive(enc, x, method="exact").double()
    est = contractive(enc, x, method="hutchinson", probes=4000,
                      generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(est, exact, rtol=0.12, atol=0)


@triton.jit
def _grad2_probe_kernel(z_ptr, g_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(g_ptr + offs, _act_grad2(tl.load(z_ptr + offs, mask=mask, other=0.0), ACT),
             mask=mask)


def test_tanh_second_derivative_is_accurate_in_relative_terms():
    # act'' enters the penalty's gradient; for tanh both -2 tanh(z) and sech^2(z) used to
    # cancel (near 0 and for large |z|).
    z = torch.tensor([1e-8, -1e-8, 1e-6, -1e-4, 0.1, -0.3, 2.0, -5.0, 12.0, -20.0])
    g = torch.empty_like(z)
    _grad2_probe_kernel[(1,)](z, g, z.numel(), ACT=activation_id("tanh"), BLOCK=16)
    z64 = z.double()
    want = -2 * torch.tanh(z64) / torch.cosh(z64) ** 2
    torch.testing.assert_close(g.double(), want, rtol=1e-6, atol=0)


def test_penalty_passes_gradcheck_through_the_op():
    # torch's numerical check of the op's backward in float64, on x and every parameter.
    torch.manual_seed(0)
    enc = Encoder(4, [5], 2, "tanh", "sigmoid").double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    params = [p for layer in enc.layers for p in (layer.weight, layer.bias)]

    def penalty(x, *p):
        ws, bs = list(p[0::2]), list(p[1::2])
        return contractive_penalty(x, ws, bs, ["tanh", "sigmoid"]).sum()

    # check_undefined_grad: a backward called without a gradient for P returns none.
    assert torch.autograd.gradcheck(penalty, (x, *params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softplus_at_its_threshold_follows_torch(backend):
    # At exactly z = 20 torch takes softplus' = sigmoid(20) and, in its double backward,
    # softplus'' = 0 (x < threshold masks it): the bias gradient is what jacrev gives.
    dtype = torch.float64 if backend == "torch" else torch.float32
    z = torch.tensor([19.0, 20.0, 21.0], dtype=dtype)
    x = torch.zeros(3, 1, dtype=dtype)
    w = torch.ones(1, 1, dtype=dtype)
    for zi in z:
        b = zi.reshape(1).clone().requires_grad_()
        got = torch.autograd.grad(contractive_penalty(x[:1], [w], [b], ["softplus"],
                                                      backend=backend).sum(), b)[0]
        b0 = b.detach().clone().requires_grad_()
        want = torch.autograd.grad(oracle(x[:1], [w], [b0], ["softplus"]).sum(), b0)[0]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_order_never_goes_negative_where_the_jacobian_cancels(backend):
    # W_1's two rows nearly equal and W_2 = [1, -1]: J = W_2 W_1 = 3e-4 v^T is ~1e-4 of
    # |W_2| |W_1|, so a^T G a cancels past float32's precision in the Gram order.
    g = torch.Generator().manual_seed(3)
    d = 64
    u, v = torch.randn(d, generator=g), torch.randn(d, generator=g)
    v = v / v.norm()
    w1 = torch.stack([u, u + 3e-4 * v])
    w2 = torch.tensor([[1.0, -1.0]])
    x = torch.randn(8, d, generator=g)
    acts = ["identity", "identity"]
    assert plan(8, [d, 2, 1]) == "gram" and plan(1, [d, 2, 1]) == "direct"
    # Identity layers: J = W_2 W_1 for every sample, ~9e-8 squared (the float32 weights').
    want = float((w2.double() @ w1.double()).pow(2).sum())
    exact = contractive_penalty(x.double(), [w1.double(), w2.double()], [None, None], acts)
    torch.testing.assert_close(exact, torch.full((8,), want, dtype=torch.float64), rtol=1e-6,
                               atol=0)
    gram = contractive_penalty(x, [w1, w2], [None, None], acts, backend=backend)
    direct = contractive_penalty(x[:1], [w1, w2], [None, None], acts, backend=backend)
    assert (gram >= 0).all(), gram
    # Within float32's error for this order: eps * h_1 * || |W_1|^T |a| ||^2 (|a| = 1, 1).
    scale = float((w1.abs().sum(0) ** 2).sum())
    assert float((gram.double() - want).abs().max()) <= 2 * 2.0 ** -23 * scale
    torch.testing.assert_close(direct.double(), exact[:1], rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_computes_the_penalty_in_float32(backend):
    # A loss term: under autocast it runs in float32, as torch's losses do, and gives what it
    # gives without autocast (bf16 codes from an autocast encoder meet float32 weights; the
    # torch path's matmuls are not autocast to bf16 beside its float32 terms).
    x, ws, bs = _problem(17, [5, 3])
    x, ws, bs = x.float(), [w.float() for w in ws], [b.float() for b in bs]
    acts = ["tanh", "sigmoid"]
    want, want_grads = _grads(lambda x_, w_, b_: contractive_penalty(
        x_, w_, b_, acts, backend=backend), x, ws, bs)

    def autocast(x_, w_, b_):  # the forward under autocast, the backward after it (as --amp)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return contractive_penalty(x_, w_, b_, acts, backend=backend)

    got, grads = _grads(autocast, x, ws, bs)
    mixed = autocast(x.bfloat16(), ws, bs)
    assert got.dtype == mixed.dtype == torch.float32
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(mixed, contractive_penalty(x.bfloat16().float(), ws, bs, acts,
                                                          backend=backend))
