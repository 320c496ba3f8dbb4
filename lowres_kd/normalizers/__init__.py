"""Invertible feature normalisers (DESIGN §2.1): one registry, one file per kind.

``build_normalizer(name, channels)`` gives an unfitted (identity) normaliser; ``update`` on
calibration batches, then ``fit``. Registered: ``standardize``, ``phi-s``, ``identity``.
"""
from .base import NORMALIZERS, Normalizer, build_normalizer
from . import identity, phi_s, standardize  # noqa: F401  (registration)
from .hadamard import hadamard, hadamard_construction

__all__ = ["NORMALIZERS", "Normalizer", "build_normalizer", "hadamard", "hadamard_construction"]
