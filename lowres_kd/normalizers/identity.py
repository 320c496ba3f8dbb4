"""``identity``: no normalisation at all (not even centring), for ablations.

It still goes through ``update``/``fit`` like the others, so a recipe can switch it in without
other changes; ``fit`` leaves ``mean = 0`` and ``tx = I``.
"""
from __future__ import annotations

import torch

from .base import Normalizer, register


@register("identity")
class Identity(Normalizer):
    centers = False

    def _solve(self, mean64: torch.Tensor, cov64: torch.Tensor) -> torch.Tensor:
        return torch.eye(self.channels, dtype=torch.float64, device=cov64.device)

    @property
    def construction(self) -> str:
        return "none"
