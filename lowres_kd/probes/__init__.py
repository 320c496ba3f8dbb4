"""Frozen-feature probes (registry) and the run report; ``run_probes(run_dir)``."""
from .base import PROBES, ProbeContext
from . import edges, fidelity, linear  # noqa: F401  (registration)
from .runner import build_subjects, run_probes

__all__ = ["PROBES", "ProbeContext", "build_subjects", "run_probes"]
