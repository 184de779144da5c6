"""fused_linear against a float64 autograd oracle, on both backends (Triton via the interpreter)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from tolerances import assert_close
from torch import nn

from aecore.kernels import ACTIVATIONS
from aecore.kernels._activations import ACT_IDS, act_grad, apply_act
from aecore.kernels.fused_linear import fused_linear, fused_linear_reference

BACKENDS = ("torch", "triton")

# The oracle's activations, written from their definitions (not through aecore's code).
ORACLE_ACT = {
    "identity": lambda z: z,
    "relu": lambda z: z.clamp_min(0),
    "leaky_relu": lambda z: torch.where(z > 0, z, 0.01 * z),
    "sigmoid": lambda z: 1 / (1 + torch.exp(-z)),
    "tanh": torch.tanh,
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "silu": lambda z: z / (1 + torch.exp(-z)),
    "softplus": lambda z: torch.where(z > 20, z, torch.log1p(torch.exp(z))),
}


def oracle(x, w, b, act, grad):
    """float64 values and (dx, dw, db) of act(x @ w.T + b) for upstream ``grad``."""
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    bd = None if b is None else b.detach().double().requires_grad_()
    z = xd @ wd.t() + (0 if bd is None else bd)
    y = ORACLE_ACT[act](z)
    y.backward(grad.double())
    return y.detach(), xd.grad, wd.grad, None if bd is None else bd.grad


def make(shape_x, n, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = shape_x[-1]
    x = torch.randn(shape_x, generator=g).to(dtype).requires_grad_()
    # Kaiming-like scale keeps z = O(1), where every activation is far from flat.
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype).requires_grad_()
    b = (torch.randn(n, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    return x, w, b


def check(x, w, b, act, backend, grad=None, tol_dtype=None, **kw):
    """Run fused_linear forward + backward and compare everything with the oracle
    (at ``tol_dtype``'s tolerance, x's dtype by default)."""
    y = fused_linear(x, w, b, act, backend=backend, **kw)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    if grad is None:
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    y.backward(grad)
    x2 = x.detach().reshape(-1, x.shape[-1])
    g2 = grad.reshape(-1, w.shape[0])
    ey, edx, edw, edb = oracle(x2, w, b, act, g2)
    M, K = x2.shape
    N = w.shape[0]
    dt = tol_dtype or x.dtype

    def scale(t):
        return max(1.0, t.abs().max().item()) if t.numel() else 1.0

    assert_close(y.reshape(M, N), ey, dt, k=K, scale=scale(ey))
    assert_close(x.grad.reshape(M, K), edx, dt, k=N, scale=scale(edx))
    assert_close(w.grad, edw, dt, k=M, scale=scale(edw))
    if b is not None:
        assert_close(b.grad, edb, dt, k=M, scale=scale(edb))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_matches_oracle_every_activation(act, dtype, backend):
    x, w, b = make((37, 50), 29, dtype)
    check(x, w, b, act, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape_x,n,bias,act", [
    ((1, 1), 1, True, "relu"),
    ((1, 1), 1, False, "tanh"),
    ((2, 5, 7), 3, True, "gelu"),
    ((2, 5, 7), 3, False, "leaky_relu"),
    ((70, 40), 66, True, "silu"),       # a 3x3 grid of tiles, two K steps
    ((37, 50), 29, False, "identity"),
    ((3, 17), 5, True, "softplus"),
])
def test_shapes_and_no_bias(shape_x, n, bias, act, backend):
    x, w, b = make(shape_x, n, bias=bias)
    check(x, w, b, act, backend)


def _leaf(t):
    return t.detach().requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "gelu", "identity"])
def test_non_contiguous_inputs(act, backend):
    g = torch.Generator().manual_seed(3)
    # x: a transposed view; weight: every other column of a wider matrix; bias: stride 2.
    x_base = _leaf(torch.randn(50, 37, generator=g))
    w_base = _leaf(torch.randn(29, 100, generator=g) / 7)
    b_base = _leaf(torch.randn(58, generator=g))
    x, w, b = x_base.t(), w_base[:, ::2], b_base[::2]
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    y = fused_linear(x, w, b, act, backend=backend)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    ey, edx, edw, edb = oracle(x, w, b, act, grad)
    assert_close(y, ey, k=50, scale=ey.abs().max().item())
    assert_close(x_base.grad.t(), edx, k=29, scale=edx.abs().max().item())
    assert_close(w_base.grad[:, ::2], edw, k=37, scale=edw.abs().max().item())
    assert not w_base.grad[:, 1::2].any()
    assert_close(b_base.grad[::2], edb, k=37, scale=edb.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_weight_and_permuted_3d_input(backend):
    g = torch.Generator().manual_seed(4)
    w_base = _leaf(torch.randn(7, 3, generator=g))        # the tied-decoder case: weight.t()
    x_base = _leaf(torch.randn(7, 2, 5, generator=g))     # -> (2, 5, 7) that can't be viewed 2-D
    x = x_base.permute(1, 2, 0)
    y = fused_linear(x, w_base.t(), None, "tanh", backend=backend)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    ey, edx, edw, _ = oracle(x.reshape(10, 7), w_base.t(), None, "tanh", grad.reshape(10, 3))
    assert_close(y.reshape(10, 3), ey, k=7)
    assert_close(x_base.grad.permute(1, 2, 0).reshape(10, 7), edx, k=3, scale=2.0)
    assert_close(w_base.grad.t(), edw, k=10, scale=edw.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["identity", "sigmoid"])
def test_stride_zero_upstream_gradients(act, backend):
    x, w, b = make((2, 5, 7), 3)
    y = fused_linear(x, w, b, act, backend=backend)
    y.sum().backward()  # autograd hands the op an expanded (stride-0) gradient
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ones = torch.ones(()).expand(y.shape)
    assert ones.stride() == (0, 0, 0)
    check(x, w, b, act, backend, grad=ones)
    for got, t in zip(grads, (x, w, b)):
        torch.testing.assert_close(got, t.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_allow_tf32_is_accepted(backend):
    x, w, b = make((37, 50), 29)
    # TF32 keeps 10 mantissa bits, like fp16: judged with fp16's tolerance (where TF32 is real).
    check(x, w, b, "gelu", backend, allow_tf32=True, tol_dtype=torch.float16)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_float64_torch_backend(act):
    x, w, b = make((4, 5), 3, torch.float64, seed=7)
    assert torch.autograd.gradcheck(
        lambda x, w, b: fused_linear(x, w, b, act, backend="torch"), (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_kinks_at_zero_follow_torch(act, backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g)
    x[::2] = 0  # rows 0, 2, 4 have z == 0 exactly (bias is zero)
    x = x.requires_grad_()
    w = torch.randn(3, 4, generator=g).requires_grad_()
    b = torch.zeros(3, requires_grad=True)
    y = fused_linear(x, w, b, act, negative_slope=0.2, backend=backend)
    grad = torch.randn(6, 3, generator=g)
    y.backward(grad)
    ref = [t.detach().requires_grad_() for t in (x, w, b)]
    fn = torch.relu if act == "relu" else (lambda z: F.leaky_relu(z, 0.2))
    yr = fn(F.linear(*ref))
    yr.backward(grad)
    assert (y[::2] == 0).all()
    torch.testing.assert_close(y, yr)
    for t, r in zip((x, w, b), ref):
        torch.testing.assert_close(t.grad, r.grad)
    expect_row = (0.0 if act == "relu" else 0.2) * grad[0] @ w.detach()
    torch.testing.assert_close(x.grad[0], expect_row)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_fp16_masks_come_from_the_stored_output(act, backend):
    # Documented (module docstring): relu/leaky_relu keep only y, so a positive z that rounds
    # to y = 0 in fp16 (z = 1e-8 < 2**-25) gets the z <= 0 gradient; from the next one up
    # (z = 6e-8, y = 2**-24, fp16's smallest subnormal) the gradient is 1 again.
    slope = 0.5
    for w_val, y_val, d in [(1e-4, 0.0, 0.0 if act == "relu" else slope), (6e-4, 2.0**-24, 1.0)]:
        x = torch.tensor([[1e-4]], dtype=torch.float16, requires_grad=True)
        w = torch.tensor([[w_val]], dtype=torch.float16)
        y = fused_linear(x, w, None, act, negative_slope=slope, backend=backend)
        y.sum().backward()
        assert float(y) == y_val
        assert float(x.grad) == float((d * w).half())


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_nan_out(act, backend):
    x, w, b = make((5, 6), 4)
    with torch.no_grad():
        x[2, 3] = float("nan")
    y = fused_linear(x, w, b, act, backend=backend)
    assert y[2].isnan().all() and not y[[0, 1, 3, 4]].isnan().any()
    y.sum().backward()
    # w's gradient sums x's rows, the NaN one included; x's own may be finite (act' constant).
    assert w.grad.isnan().any()
    if act == "gelu":
        assert x.grad[2].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_zero_size_batch(act, backend):
    x, w, b = make((0, 6), 4)
    y = fused_linear(x, w, b, act, backend=backend)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 6)
    assert torch.equal(w.grad, torch.zeros(4, 6)) and torch.equal(b.grad, torch.zeros(4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("act,bias", [("identity", False), ("gelu", True)])
def test_zero_in_features_with_leading_dims(act, bias, dtype, backend):
    # x (2, 4, 0): reshape(-1, 0) can't infer the rows of an empty tensor.
    x = torch.randn(2, 4, 0).to(dtype).requires_grad_()
    w = torch.randn(3, 0).to(dtype).requires_grad_()
    b = torch.tensor([0.5, -1.25, 2.0], dtype=dtype, requires_grad=True) if bias else None
    y = fused_linear(x, w, b, act, backend=backend)
    assert y.shape == (2, 4, 3) and y.dtype == dtype
    grad = torch.ones(2, 4, 3, dtype=dtype)
    y.backward(grad)
    ey, edx, edw, edb = oracle(x.detach().reshape(8, 0), w, b, act, grad.reshape(8, 3))
    assert_close(y.reshape(8, 3), ey, scale=2.0)
    assert x.grad.shape == (2, 4, 0) and w.grad.shape == (3, 0)
    if bias:
        assert_close(b.grad, edb, k=8, scale=8.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_gradients(backend):
    # Frozen weight with a trainable bias: db without dW; x without grad: no dX.
    x, w, b = make((9, 6), 4)
    w.requires_grad_(False)
    y = fused_linear(x.detach(), w, b, "silu", backend=backend)
    grad = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    y.backward(grad)
    _, _, _, edb = oracle(x, w, b, "silu", grad)
    assert w.grad is None and x.grad is None
    assert_close(b.grad, edb, k=9, scale=edb.abs().max().item())


@pytest.mark.parametrize("act,keeps_z", [("identity", False), ("relu", False),
                                         ("sigmoid", False), ("tanh", False), ("gelu", True),
                                         ("softplus", True)])
def test_pre_activation_kept_only_when_needed(act, keeps_z):
    x, w, b = make((5, 6), 4)
    for use_triton in (False, True):
        _, z = torch.ops.aecore.fused_linear(x, w, b, act, 0.01, use_triton, False)
        assert z.shape == ((5, 4) if keeps_z else (0,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_without_grad(backend, dtype):
    x, w, b = make((6, 9), 5, dtype)
    with torch.no_grad():
        y = fused_linear(x, w, b, "softplus", backend=backend)
    assert not y.requires_grad and y.dtype == dtype
    ey = oracle(x, w, b, "softplus", torch.ones(6, 5))[0]
    assert_close(y, ey, dtype, k=9, scale=ey.abs().max().item())


# z where naive fp32 formulas lose relative accuracy: tanh = 1 - 2 / (exp(2z) + 1) cancels near
# 0, log(1 + exp(z)) is 0 below z ~ -17, 1 - tanh^2 cancels in the tails.
ACCURACY_Z = [1e-8, -1e-8, 1e-6, -1e-6, 1e-4, -1e-4, 0.1, -0.1, 5.0, -5.0, -20.0, -50.0]

ORACLE_GRAD = {
    "tanh": lambda z: 1 / torch.cosh(z) ** 2,
    "softplus": torch.sigmoid,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["tanh", "softplus"])
def test_relative_accuracy_fp32(act, backend):
    z = torch.tensor(ACCURACY_Z)
    x = z[:, None].clone().requires_grad_()
    y = fused_linear(x, torch.ones(1, 1), None, act, backend=backend)  # z exact: x * 1
    y.sum().backward()
    z64 = z.double()[:, None]
    torch.testing.assert_close(y.double(), ORACLE_ACT[act](z64), rtol=1e-6, atol=0)
    # tanh's backward is 1 - y^2 from the stored output (as torch's): accurate in relative
    # terms only while |y| is well below 1; the z-based derivative is checked below.
    keep = slice(None) if act == "softplus" else z64[:, 0].abs() <= 0.1
    torch.testing.assert_close(x.grad.double()[keep], ORACLE_GRAD[act](z64)[keep], rtol=1e-6,
                               atol=0)


@triton.jit
def _act_probe_kernel(z_ptr, y_ptr, g_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, apply_act(z, ACT, 0.01), mask=mask)
    tl.store(g_ptr + offs, act_grad(z, ACT, 0.01), mask=mask)


@pytest.mark.parametrize("act", ["tanh", "softplus"])
def test_device_functions_relative_accuracy_fp32(act):
    # act' from z (the contractive kernels use it for tanh too), not only through fused_linear.
    z = torch.tensor(ACCURACY_Z)
    y, g = torch.empty_like(z), torch.empty_like(z)
    _act_probe_kernel[(1,)](z, y, g, z.numel(), ACT=ACT_IDS[act], BLOCK=16)
    z64 = z.double()
    torch.testing.assert_close(y.double(), ORACLE_ACT[act](z64), rtol=1e-6, atol=0)
    # atol: tanh'(-50) ~ 1.5e-43 is an fp32 subnormal, stored to a few subnormal steps (1.4e-45).
    torch.testing.assert_close(g.double(), ORACLE_GRAD[act](z64), rtol=1e-6, atol=1e-44)


def test_reference_matches_oracle_and_keeps_dtype():
    x, w, b = make((7, 9), 5, torch.float16)
    y = fused_linear_reference(x, w, b, "gelu")
    assert y.dtype == torch.float16
    assert_close(y, oracle(x, w, b, "gelu", torch.ones(7, 5))[0], torch.float16, k=9, scale=2.0)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("act", ["relu", "gelu", "identity"])
def test_opcheck(act, use_triton):
    x, w, b = make((5, 7), 3)
    for bias in (b, None):
        torch.library.opcheck(torch.ops.aecore.fused_linear.default,
                              (x, w, bias, act, 0.01, use_triton, False))
    saved = torch.randn(5, 3) if act != "identity" else torch.empty(0)
    torch.library.opcheck(torch.ops.aecore.fused_linear_backward.default,
                          (torch.randn(5, 3), x.detach(), w.detach(), saved, True, act, 0.01,
                           use_triton, False, True, True))


class TwoLayer(nn.Module):
    def __init__(self, backend="auto"):
        super().__init__()
        self.l1 = nn.Linear(7, 6)
        self.l2 = nn.Linear(6, 4)
        self.backend = backend

    def forward(self, x):
        h = fused_linear(x, self.l1.weight, self.l1.bias, "gelu", backend=self.backend)
        return fused_linear(h, self.l2.weight, self.l2.bias, "sigmoid", backend=self.backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_matches_eager(backend):
    # Inductor builds its CPU C++ in ~2 s here; fullgraph proves the op traces as one node.
    torch.manual_seed(0)
    model = TwoLayer(backend)
    x = torch.randn(9, 7)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ye = model(x)
    ye.square().sum().backward()
    torch.testing.assert_close(y, ye)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_double_backward_raises(dtype):
    # The half-precision torch path saves z without its graph: a second derivative through
    # it would be silently wrong, so create_graph=True is refused (fp32 runs plain autograd).
    x, w, b = make((3, 4), 2, dtype=dtype)
    y = fused_linear(x, w, b, "gelu", backend="torch")
    with pytest.raises(RuntimeError, match="fused_linear does not support double backward"):
        torch.autograd.grad(y.float().sum(), x, create_graph=True)
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, w, b))
    (gx,) = torch.autograd.grad(fused_linear(x32, w32, b32, "gelu").sum(), x32,
                                create_graph=True)
    assert gx.requires_grad


def test_compiled_jvp_keeps_the_tangent():
    # Inside a compiled torch.func.jvp the op must run math with forward-mode rules.
    torch.manual_seed(0)
    x, t, w, b = torch.randn(4, 3), torch.randn(4, 3), torch.randn(2, 3), torch.randn(2)

    def tangent(x, t):
        return torch.func.jvp(lambda v: fused_linear(v, w, b, "gelu"), (x,), (t,))[1]

    expected = torch.func.jvp(lambda v: fused_linear_reference(v, w, b, "gelu"),
                              (x.double(),), (t.double(),))[1]
    got = torch.compile(tangent, fullgraph=True)(x, t)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_torch_export_dynamic_batch():
    torch.manual_seed(0)
    model = TwoLayer().eval()
    ep = torch.export.export(model, (torch.randn(4, 7),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("aecore" in t for t in targets), targets
    for batch in (1, 11):
        x = torch.randn(batch, 7)
        torch.testing.assert_close(ep.module()(x), model(x))


def test_onnx_export_has_only_standard_ops(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = TwoLayer().eval()
    prog = torch.onnx.export(model, (torch.randn(4, 7),), dynamo=True,
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                             input_names=["x"], output_names=["y"])
    path = tmp_path / "m.onnx"
    prog.save(str(path), external_data=False)
    proto = prog.model_proto
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), \
        [(n.domain, n.op_type) for n in proto.graph.node]
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert {n.op_type for n in proto.graph.node} >= {"Gelu", "Sigmoid"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(13, 7)
    got = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


# --- bad inputs ----------------------------------------------------------------------------------

def _bad_cases():
    x, w, b = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3)
    return [
        ((x.tolist(), w, b), {}, TypeError, "x must be a torch.Tensor, got list"),
        ((x, None, b), {}, TypeError, "weight must be a torch.Tensor, got NoneType"),
        ((x, w, [0.0] * 3), {}, TypeError, "bias must be a torch.Tensor, got list"),
        ((x, torch.randn(3, 4), b), {}, ValueError,
         r"x.shape\[-1\] must equal weight.shape\[1\] \(in_features = 4\), got x of shape "
         r"\(4, 5\)"),
        ((x, torch.randn(3, 5, 1), b), {}, ValueError,
         r"weight must be 2-D \(out_features, in_features\), got shape \(3, 5, 1\)"),
        ((x, w, torch.randn(4)), {}, ValueError, r"bias must have shape \(3,\) .*got \(4,\)"),
        ((x, w, torch.randn(3, 1)), {}, ValueError, r"bias must have shape \(3,\)"),
        ((torch.tensor(1.0), w, b), {}, ValueError, "x must have at least 1 dimension"),
        ((x, w.double(), b), {}, TypeError,
         "weight must have x's dtype torch.float32, got torch.float64"),
        ((x, w, b.half()), {}, TypeError,
         "bias must have x's dtype torch.float32, got torch.float16"),
        ((x, w, b.to("meta")), {}, ValueError, "bias must be on x's device cpu, got meta"),
        ((x.long(), w.long(), b.long()), {}, TypeError,
         "x must be a floating-point tensor .*got torch.int64"),
        ((x, w.int(), b), {}, TypeError, "weight must be a floating-point tensor"),
        ((x, w, b, "swish"), {}, ValueError, "activation must be one of .*got 'swish'"),
        ((x, w, b, "relu"), {"negative_slope": "0.1"}, TypeError,
         "negative_slope must be a real number, got str"),
        ((x, w, b, "leaky_relu"), {"negative_slope": float("nan")}, ValueError,
         "negative_slope must be finite, got nan"),
        ((x, w, b), {"allow_tf32": 1}, TypeError, "allow_tf32 must be a bool, got int"),
        ((x, w, b), {"backend": "cuda"}, ValueError, "backend must be one of"),
        ((x.double(), w.double(), b.double()), {"backend": "triton"}, TypeError,
         "use backend='torch' for float64"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise_clear_errors(case):
    args, kwargs, exc, msg = _bad_cases()[case]
    with pytest.raises(exc, match=msg):
        fused_linear(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_usual_call_matches_the_general_path(monkeypatch, dtype, bias):
    # The usual call (fp32/fp64 CPU tensors, no options) skips the general path's separate
    # checks; forcing that path (AECORE_BACKEND=torch) must give the same values and gradients.
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(7, 5, generator=g, dtype=dtype)
    w0 = torch.randn(3, 5, generator=g, dtype=dtype)
    b0 = torch.randn(3, generator=g, dtype=dtype) if bias else None
    gy = torch.randn(7, 3, generator=g, dtype=dtype)

    def run():
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = None if b0 is None else b0.clone().requires_grad_()
        y = fused_linear(x, w, b, "leaky_relu", negative_slope=0.2)
        y.backward(gy)
        return [y, x.grad, w.grad] + ([] if b is None else [b.grad])

    usual = run()
    monkeypatch.setenv("AECORE_BACKEND", "torch")
    general = run()
    assert all(torch.equal(a, e) for a, e in zip(usual, general))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_layer_in_its_dtype(backend):
    # Under autocast a layer computes in autocast's dtype, as F.linear does, whatever mix it is
    # given (a convolution's bf16 features, float32 parameters): the oracle on the bf16-rounded
    # operands; the float32 parameters get float32 gradients. float64 is left alone.
    x, w, b = make((5, 17), 9)
    xb = x.detach().bfloat16().requires_grad_()
    grad = torch.randn(5, 9, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_linear(xb, w, b, "tanh", backend=backend)
        y32 = fused_linear(x, w, b, "tanh", backend=backend)  # float32 features too
    assert y.dtype == y32.dtype == torch.bfloat16
    y.backward(grad)
    assert w.grad.dtype == b.grad.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    ey, edx, edw, edb = oracle(xb.float(), w.bfloat16(), b.bfloat16(), "tanh", grad)
    assert_close(y, ey, torch.bfloat16, k=17)
    assert_close(xb.grad, edx, torch.bfloat16, k=9, scale=edx.abs().max().item())
    assert_close(w.grad, edw, torch.bfloat16, k=5, scale=edw.abs().max().item())
    assert_close(b.grad, edb, torch.bfloat16, k=5, scale=edb.abs().max().item())
    if backend == "torch":
        x64, w64, b64 = make((5, 17), 9, torch.float64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fused_linear(x64, w64, b64, "tanh", backend=backend).dtype == torch.float64
