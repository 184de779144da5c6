"""The one place where an op picks its backend: Triton kernels or the torch reference.

``auto`` runs Triton for CUDA tensors and the torch reference elsewhere. ``AECORE_BACKEND``
(``triton`` | ``torch`` | ``auto``) or an explicit ``backend=`` argument forces a choice.
With ``TRITON_INTERPRET=1`` the Triton path also runs on CPU tensors (that is how the tests
exercise the kernels on machines without a GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import numbers
import os

import torch

BACKENDS = ("auto", "triton", "torch")


# Reading the environment on every call keeps AECORE_BACKEND settable at run time. For an unset
# name os.environ.get raises and catches two KeyErrors, several microseconds on a small op's hot
# path; the mapping's own dict, which every os.environ write updates, answers at once.
_BACKEND_KEY = os.environ.encodekey("AECORE_BACKEND")


def env_backend() -> str:
    """AECORE_BACKEND's value, ``"auto"`` when it is unset or empty."""
    data = getattr(os.environ, "_data", None)
    if data is None:  # not CPython's os.environ
        return os.environ.get("AECORE_BACKEND") or "auto"
    value = data.get(_BACKEND_KEY)
    return os.environ.decodevalue(value) if value else "auto"


_TRUTHY = ("1", "true", "on", "yes", "y")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``), read as
    Triton reads it: 1, true, on, yes or y in any case; anything else (0, false, off) is off."""
    # Parsed here, not through triton.knobs, which torch.compile can't trace.
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUTHY


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def exporting() -> bool:
    """True while torch.export or ONNX export traces: ops then emit their reference math."""
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())


# The dtypes autocast casts from (float64 it leaves alone).
_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)


def autocasting(t: torch.Tensor) -> torch.dtype | None:
    """autocast's lower-precision dtype where it is on for ``t``'s device type, else None."""
    device = t.device.type
    if not torch.amp.is_autocast_available(device):  # meta tensors, say: autocast has no state
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def autocast_cast(dtype: torch.dtype, *tensors):
    """``tensors`` as autocast casts an op's inputs: float32/16 and bfloat16 ones to ``dtype``;
    float64 ones, None and anything else as they are."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_FROM
                 else t for t in tensors)


_forward_ad = torch.autograd.forward_ad
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def transformed(*tensors: torch.Tensor | None) -> bool:
    """True when a tensor is inside a torch.func transform (vmap, jvp, jacrev) or carries a
    forward-mode tangent: the custom ops have no rules for those, the reference math does."""
    # Tangents exist only inside a dual level (torch.func.jvp opens one too); outside one, skip
    # unpacking (the eager hot path).
    dual = _forward_ad._current_level >= 0
    if torch.compiler.is_compiling():
        # The per-tensor checks below aren't traceable, but the level is: inside a compiled
        # jvp the opaque op would drop the tangent silently. (A compiled vmap batches the op
        # itself, correctly.)
        return dual
    for t in tensors:
        if t is None:
            continue
        if _is_functorch_wrapped(t):
            return True
        if dual and _forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False


# Tensors without a __torch_function__ of their own: a layer's weights are Parameters.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_cpu(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> bool:
    """True when an op on plain tensors a, b (and c, if given) runs its torch path in plain
    eager mode: all on the CPU, AECORE_BACKEND auto or unset, not compiling, tracing or
    exporting, no torch.func transform and no forward-mode dual level. The small ops' hot-path
    test as one expression: the separate checks (resolve, exporting, transformed) cost several
    microseconds each right after other work has evicted them from the caches."""
    # is_compiling first: under dynamo it is True and the rest, not all traceable, is skipped.
    return (not torch.compiler.is_compiling() and type(a) in _PLAIN
            and type(b) in _PLAIN and a.is_cpu and b.is_cpu
            and _forward_ad._current_level < 0 and not _is_functorch_wrapped(a)
            and not _is_functorch_wrapped(b) and not torch._C._is_tracing()
            and env_backend() == "auto"
            and (c is None or (type(c) in _PLAIN and c.is_cpu
                               and not _is_functorch_wrapped(c))))


def first_order_only(op: str) -> None:
    """RuntimeError unless this backward runs without ``create_graph``: the ops' own backward
    passes compute from tensors saved without their graph, so a second derivative through
    them would silently miss terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} does not support double backward (create_graph=True) on "
                           "this path; differentiate its reference math instead "
                           f"({op}_reference)")


def check_slope(negative_slope: object) -> None:
    """TypeError unless leaky_relu's ``negative_slope`` is a real number (not a bool),
    ValueError unless it is finite."""
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a real number, got "
                        f"{type(negative_slope).__name__}")
    if not math.isfinite(negative_slope):
        raise ValueError(f"negative_slope must be finite, got {negative_slope!r}")


def check_like(name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    """TypeError/ValueError naming ``name`` unless ``t`` (if given) has x's dtype and device."""
    if t is None:
        return
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def check_backend(backend: object, source: str = "backend") -> None:
    """ValueError naming ``source`` unless ``backend`` is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")


def resolve(backend: str | None, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op on ``tensors``.

    Raises ValueError for an unknown name (naming $AECORE_BACKEND when the name came from it),
    RuntimeError when Triton is forced where it can't run (no triton package; CPU tensors
    without the interpreter) and TypeError for float64, which the kernels don't take.
    """
    source = "backend"
    if backend is None:
        backend, source = env_backend(), "AECORE_BACKEND"
    check_backend(backend, source)
    on_cuda = True
    for t in tensors:  # a loop, not all(<generator>): this runs on every op's eager call
        if not t.is_cuda:
            on_cuda = False
            break
    if (backend == "auto" and not on_cuda) or exporting():
        return "torch"
    if backend == "auto":
        use_triton = on_cuda and triton_available() and not any(
            t.dtype == torch.float64 for t in tensors
        )
        return "triton" if use_triton else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if not (on_cuda or interpreting()):
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU; "
                f"got tensors on {sorted({str(t.device) for t in tensors})}"
            )
        if any(t.dtype == torch.float64 for t in tensors):
            raise TypeError("backend='triton' takes float32, float16 or bfloat16 tensors; "
                            "use backend='torch' for float64")
    return backend
