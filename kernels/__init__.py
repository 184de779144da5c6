"""aecore.kernels: Triton kernels behind torch autograd, each with a torch reference path.

Each op lives in its own module (``aecore.kernels.<op>``): Triton kernels, the torch reference,
the custom-op registration and the public function, which is re-exported here.
"""

from aecore.kernels._activations import ACTIVATIONS
from aecore.kernels._backend import BACKENDS
from aecore.kernels.contractive import contractive_penalty, contractive_penalty_reference
from aecore.kernels.fused_linear import fused_linear, fused_linear_reference
from aecore.kernels.reparameterize import reparameterize, reparameterize_reference
from aecore.kernels.sparsity import kl_sparsity, kl_sparsity_reference
from aecore.kernels.vq import vq_nearest, vq_nearest_reference

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "contractive_penalty",
    "contractive_penalty_reference",
    "fused_linear",
    "fused_linear_reference",
    "kl_sparsity",
    "kl_sparsity_reference",
    "reparameterize",
    "reparameterize_reference",
    "vq_nearest",
    "vq_nearest_reference",
]
