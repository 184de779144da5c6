"""Activations shared by the fused kernels: names, Triton device functions, torch references.

Derivatives follow torch's autograd conventions, kinks included: relu'(0) = 0,
leaky_relu'(0) = negative_slope, softplus is linear above 20 (beta = 1, threshold = 20),
gelu is the exact erf form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu", "softplus")
ACT_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}


def activation_id(name: object, arg: str = "activation") -> int:
    """The kernel's integer id for ``name``; ValueError naming ``arg`` when unknown."""
    if not isinstance(name, str) or name not in ACT_IDS:
        raise ValueError(f"{arg} must be one of {ACTIVATIONS}, got {name!r}")
    return ACT_IDS[name]


# --- torch references --------------------------------------------------------------------------

def act_torch(z: torch.Tensor, name: str, negative_slope: float = 0.01) -> torch.Tensor:
    """act(z), elementwise."""
    if name == "identity":
        return z
    if name == "relu":
        return torch.relu(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "silu":
        return F.silu(z)
    if name == "softplus":
        return F.softplus(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def act_grad_torch(z: torch.Tensor, name: str, negative_slope: float = 0.01) -> torch.Tensor:
    """act'(z), elementwise, with torch's values at the kinks."""
    if name == "identity":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, negative_slope))
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if name == "tanh":
        t = torch.tanh(z)
        return 1 - t * t
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
        return cdf + z * pdf
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "softplus":
        return torch.where(z > 20, torch.ones_like(z), torch.sigmoid(z))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


# --- Triton device functions (fp32 in, fp32 out) ---------------------------------------------

@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    """tanh(z), accurate in relative terms for every z (fp32)."""
    a = tl.abs(z)
    # e = exp(-2|z|) never overflows, and 1 - e is exact for e >= 1/2 (Sterbenz); e's own
    # rounding is amplified by e / (1 - e), which grows without bound as z -> 0, so below
    # |z| = 1/4 (amplification 1.5) the Taylor series takes over: its first omitted term,
    # 1382/155925 z^11, is under 1e-8 of tanh there.
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(z < 0, -t, t)
    z2 = z * z
    p = z + z * z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0 + z2 * (62.0 / 2835.0))))
    return tl.where(a < 0.25, p, t)


@triton.jit
def _log1p(x):
    """log(1 + x) for x >= 0, accurate in relative terms down to x -> 0 (fp32)."""
    # Goldberg's trick: u - 1 is exactly the x that u = 1 + x rounded to, and log(u) / (u - 1)
    # is smooth, so the ratio cancels the rounding (a few ulps); u == 1 means x < 2**-24,
    # where log1p(x) = x to fp32 precision. (libdevice's log1p would do, but the interpreter
    # the tests run in has no extern functions.)
    u = 1.0 + x
    d = u - 1.0
    r = tl.log(u) * (x / tl.where(d == 0.0, 1.0, d))
    return tl.where(d == 0.0, x, r)


@triton.jit
def apply_act(z, ACT: tl.constexpr, slope):
    """act(z) for the id ``ACT`` (see ACTIVATIONS); ``z`` is fp32."""
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)  # not maximum(z, 0), which turns NaN into 0 (torch keeps it)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        z = _sigmoid(z)
    elif ACT == 4:
        z = _tanh(z)
    elif ACT == 5:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 6:
        z = z * _sigmoid(z)
    elif ACT == 7:
        # log1p(exp(z)) written stably: max(z, 0) + log1p(exp(-|z|)); linear above 20. A plain
        # log(1 + exp(z)) would be 0 below z ~ -17, where softplus(z) ~ exp(z).
        sp = tl.maximum(z, 0.0) + _log1p(tl.exp(-tl.abs(z)))
        z = tl.where(z > 20.0, z, sp)
    return z


@triton.jit
def act_grad(z, ACT: tl.constexpr, slope):
    """act'(z) for the id ``ACT``; ``z`` is fp32 (the pre-activation)."""
    if ACT == 0:
        g = tl.full(z.shape, 1.0, tl.float32)
    elif ACT == 1:
        g = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where(z > 0, 1.0, slope)
    elif ACT == 3:
        s = _sigmoid(z)
        g = s * (1.0 - s)
    elif ACT == 4:
        # 1 - tanh^2 = 4e / (1 + e)^2 with e = exp(-2|z|): no 1 - t^2 cancellation in the tails.
        e = tl.exp(-2.0 * tl.abs(z))
        g = 4.0 * e / ((1.0 + e) * (1.0 + e))
    elif ACT == 5:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        g = cdf + z * pdf
    elif ACT == 6:
        s = _sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    else:
        g = tl.where(z > 20.0, 1.0, _sigmoid(z))
    return g
