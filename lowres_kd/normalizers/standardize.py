"""``standardize``: per-channel mean and standard deviation (a diagonal ``tx``).

``tx = diag(1 / max(std, eps))``: every channel gets zero mean and unit variance on the
calibration data; correlations between channels are left as they are.
"""
from __future__ import annotations

import torch

from .base import Normalizer, register


@register("standardize")
class Standardize(Normalizer):
    def _solve(self, mean64: torch.Tensor, cov64: torch.Tensor) -> torch.Tensor:
        std = cov64.diagonal().clamp_min(0).sqrt().clamp_min(self.eps)
        return torch.diag(1.0 / std)

    @property
    def construction(self) -> str:
        return "diagonal 1/std"
