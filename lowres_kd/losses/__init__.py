"""Distillation losses: per-row distances (registry) and the fused head + loss reference."""
from .distance import DISTANCES, cos_smoothl1, cosine_distance_rows, smooth_l1_rows
from .fused_linear_distill import REDUCTIONS, fused_linear_distill_reference

__all__ = ["DISTANCES", "cos_smoothl1", "cosine_distance_rows", "smooth_l1_rows", "REDUCTIONS", "fused_linear_distill_reference"]
