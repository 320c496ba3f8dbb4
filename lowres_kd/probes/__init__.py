"""Frozen-feature probes: one registered function per file (``lowres_kd.evaluation`` runs them)."""
from .base import PROBES, ProbeContext
from . import edges, fidelity, knn, linear, segmentation  # noqa: F401  (registration)

__all__ = ["PROBES", "ProbeContext"]
