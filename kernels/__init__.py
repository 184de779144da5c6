"""aecore.kernels: Triton kernels behind torch autograd, each with a torch reference path."""

from aecore.kernels._activations import ACTIVATIONS
from aecore.kernels._backend import BACKENDS

__all__ = ["ACTIVATIONS", "BACKENDS"]
