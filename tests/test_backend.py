"""Backend choice: AECORE_BACKEND is read on every call, whichever way the environment changes."""

import os

import pytest
import torch

from aecore.kernels import reparameterize
from aecore.kernels._backend import env_backend, resolve


def test_env_backend_follows_every_write(monkeypatch):
    monkeypatch.delenv("AECORE_BACKEND", raising=False)
    assert env_backend() == "auto"
    monkeypatch.setenv("AECORE_BACKEND", "torch")
    assert env_backend() == "torch"
    monkeypatch.setenv("AECORE_BACKEND", "")
    assert env_backend() == "auto"
    os.environ["AECORE_BACKEND"] = "triton"  # a plain write, as a user's script does
    assert env_backend() == "triton"
    del os.environ["AECORE_BACKEND"]
    assert env_backend() == "auto"


def test_a_backend_set_at_run_time_applies_to_the_next_call(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("AECORE_BACKEND", "torch")
    assert resolve(None, x) == "torch"
    monkeypatch.setenv("AECORE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        resolve(None, x)
    monkeypatch.setenv("AECORE_BACKEND", "bogus")
    # The error names the variable: the caller passed no backend.
    with pytest.raises(ValueError, match="AECORE_BACKEND must be one of .*, got 'bogus'"):
        reparameterize(x, x)
    monkeypatch.delenv("AECORE_BACKEND")
    assert resolve(None, x) == "torch"


def test_auto_runs_torch_when_any_tensor_is_off_cuda(monkeypatch):
    monkeypatch.delenv("AECORE_BACKEND", raising=False)
    cpu, meta = torch.zeros(2), torch.empty(2, device="meta")
    assert resolve(None, cpu) == "torch"
    assert resolve(None, meta, cpu) == "torch"
    assert resolve("torch", cpu) == "torch"


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes", "y", "0", "false", "off", "2", ""])
def test_interpreting_reads_the_variable_as_triton_does(monkeypatch, value):
    # "false" meant on to aecore and off to Triton: backend="triton" on CPU tensors then gave
    # Triton's "0 active drivers" instead of the error naming TRITON_INTERPRET.
    import triton

    from aecore.kernels._backend import interpreting

    monkeypatch.setenv("TRITON_INTERPRET", value)
    on = bool(triton.knobs.runtime.interpret)
    assert interpreting() is on
    if not on:
        with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
            resolve("triton", torch.zeros(2, 3))


def test_meta_tensors_infer_shapes():
    # Shape inference on the meta device, as torch's own layers allow it: autocast has no state
    # there and no generator draws noise there (both raised internal errors).
    from aecore.kernels import contractive_penalty, fused_linear

    x, w = torch.empty(5, 4, device="meta"), torch.empty(3, 4, device="meta")
    assert fused_linear(x, w, None, "tanh").shape == (5, 3)
    assert contractive_penalty(x, [w], [None], ["tanh"]).shape == (5,)
    z, kl = reparameterize(x, x)
    assert z.shape == (5, 4) and kl.shape == (5,) and z.device.type == "meta"
