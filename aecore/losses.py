"""Loss terms beyond plain reconstruction, gathered in one namespace.

- ``contractive(encoder, x, method="exact"|"hutchinson")``: ||J_f(x)||_F^2 per sample.
- ``kl_sparsity(h, rho)``: sum_j KL(rho || mean_b h[b, j]) of sigmoid codes h (B, H).
- ``l1_sparsity(h)``: batch mean of the L1 norm of codes h (B, H).
"""

from aecore.contractive import contractive
from aecore.kernels.sparsity import kl_sparsity
from aecore.sparse import l1_sparsity

__all__ = ["contractive", "kl_sparsity", "l1_sparsity"]
