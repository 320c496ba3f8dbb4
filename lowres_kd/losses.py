"""The distances a recipe may name (``loss.distance``): the kernel package's, as a registry
that recipe checks and tests read like every other."""
from lowres_kd_kernels import DISTANCES as _KERNEL_DISTANCES
from lowres_kd_kernels import REDUCTIONS, fused_linear_distill_reference

from .registry import Registry

DISTANCES = Registry("distance")
for _name, _fn in _KERNEL_DISTANCES.items():
    DISTANCES.register(_name)(_fn)

__all__ = ["DISTANCES", "REDUCTIONS", "fused_linear_distill_reference"]
