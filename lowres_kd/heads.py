"""Student-to-teacher heads h_s2t (DESIGN §2.2).

Each head is LayerNorm -> Linear(D, hidden) -> GELU -> Linear(hidden, C_t). The last linear is
kept apart (``out``) so training can fuse it with the loss (``lowres_kd_kernels``); ``trunk``
gives its input. Heads rebuild from a state dict alone: sizes come from the weight shapes.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class Head(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU())
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, rows: torch.Tensor, target: Optional[torch.Tensor] = None,
                loss_fn: Optional[nn.Module] = None) -> torch.Tensor:
        """The projection, or with ``target`` the distillation loss of ``out`` fused with
        ``loss_fn`` (a ``FusedLinearDistill``): one module call either way, so that ZeRO-3 gathers
        ``out``'s weights (registered as external parameters of this module) before use."""
        hidden = self.trunk(rows)
        if target is None:
            return self.out(hidden)
        return loss_fn(hidden, self.out, target)

    @staticmethod
    def sizes_from_state_dict(sd: Dict[str, torch.Tensor], prefix: str = "") -> Tuple[int, int, int]:
        hidden, in_dim = sd[prefix + "trunk.1.weight"].shape
        return in_dim, hidden, sd[prefix + "out.weight"].shape[0]


def dense_rows(dense: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(N, D, H, W) student map -> resized bilinearly to the teacher grid -> (N*h*w, D) rows.

    Resized in channels-last layout: the rows are then a view, and PyTorch's CPU bilinear kernel
    runs 3-4x faster over a wide channels-last map (bit-identical values and gradients)."""
    if tuple(dense.shape[-2:]) != tuple(grid):
        dense = F.interpolate(dense.contiguous(memory_format=torch.channels_last), size=tuple(grid), mode="bilinear",
                              align_corners=False)
    return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1])


def rows_to_map(rows: torch.Tensor, n: int, grid: Tuple[int, int]) -> torch.Tensor:
    """(N*h*w, C) rows -> (N, C, h, w)."""
    h, w = grid
    return rows.reshape(n, h, w, -1).permute(0, 3, 1, 2)


class TeacherHeads(nn.Module):
    """The global and the dense head that map the student onto one teacher."""

    def __init__(self, student_dims: Tuple[int, int], teacher_dims: Tuple[int, int], grid: Tuple[int, int], hidden: int):
        super().__init__()
        self.global_ = Head(student_dims[0], hidden, teacher_dims[0])
        self.dense = Head(student_dims[1], hidden, teacher_dims[1])
        self.grid = tuple(grid)

    def forward(self, student_global: torch.Tensor, student_dense: torch.Tensor):
        n = student_dense.shape[0]
        return self.global_(student_global), rows_to_map(self.dense(dense_rows(student_dense, self.grid)), n, self.grid)
