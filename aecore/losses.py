"""Loss terms beyond plain reconstruction, gathered in one namespace.

- ``contractive(encoder, x, method="exact"|"hutchinson")``: ||J_f(x)||_F^2 per sample.
"""

from aecore.contractive import contractive

__all__ = ["contractive"]
