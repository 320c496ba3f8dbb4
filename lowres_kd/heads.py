"""Student-to-teacher heads h_s2t (DESIGN §2.2).

Each head is LayerNorm -> Linear(D, hidden) -> GELU -> Linear(hidden, C_t). The last linear is
kept apart (``out``) so training can fuse it with the loss (``lowres_kd_kernels``); ``trunk``
gives its input. Heads rebuild from a state dict alone: sizes come from the weight shapes.

A dense head whose teacher grid is finer than the student's map (HED's 32 x 32 against a 20 x 20
student, SAM's 64 x 64 against a ViT's 16 x 16) runs its trunk at the student's resolution and
resizes after the first linear, with the LayerNorm's statistics of the resized rows computed
exactly from neighbouring pixels' dot products: the same function as resizing first, on
``(H*W) / (h*w)`` of the rows.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class Head(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU())
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None,
                loss_fn: Optional[nn.Module] = None, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The projection of rows ``x`` (M, D), or with ``grid`` of a map (N, D, H, W) resized to
        it (rows N*h*w); with ``target`` the distillation loss of ``out`` fused with ``loss_fn`` (a
        ``FusedLinearDistill``). One module call either way, so that ZeRO-3 gathers the weights
        used here (registered as external parameters of this module) before use."""
        hidden = self.hidden(x, grid)
        if target is None:
            return self.out(hidden)
        return loss_fn(hidden, self.out, target)

    def hidden(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """``trunk`` of rows, or of a map resized to ``grid``: resized first where that gives no
        more rows, else resized after the first linear (``_trunk_upsampled``)."""
        if grid is None:
            return self.trunk(x)
        if grid[0] * grid[1] <= x.shape[-2] * x.shape[-1]:
            return self.trunk(dense_rows(x, grid))
        return self._trunk_upsampled(x, tuple(grid))

    def _trunk_upsampled(self, dense: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """``trunk(dense_rows(dense, grid))`` at ``dense``'s resolution. Resizing is a weighted
        mean of neighbours (weights summing to 1), so with z = x - mean_c(x) per pixel the resized
        row's centred value is the resized z, and LayerNorm-then-linear is
        ``resize(z @ (W*gamma).T) / sigma + W @ beta + b``; sigma² is the resized z's squared
        norm over D, which ``resized_sq_norm`` gets from dot products of neighbouring pixels."""
        norm, linear, act = self.trunk
        n, d, h, w = dense.shape
        z = dense - dense.mean(1, keepdim=True)
        y = F.linear(z.permute(0, 2, 3, 1).reshape(-1, d), linear.weight * norm.weight)
        y = F.interpolate(y.reshape(n, h, w, -1).permute(0, 3, 1, 2), size=grid, mode="bilinear", align_corners=False)
        var = resized_sq_norm(z.to(torch.promote_types(z.dtype, torch.float32)), grid) / d  # bf16 in, fp32 sums
        shift = linear.weight @ norm.bias + linear.bias
        pre = y.permute(0, 2, 3, 1) * torch.rsqrt(var + norm.eps).unsqueeze(-1) + shift
        return act(pre.reshape(-1, pre.shape[-1]).to(y.dtype))

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


@functools.lru_cache(maxsize=None)
def bilinear_taps(n_in: int, n_out: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis of a bilinear resize (``align_corners=False``, no antialias): each output's
    first source index i (the second is i + 1) and the two weights, read from PyTorch's own
    resize of an identity; the second weight is 0 where the edge clamps."""
    eye = torch.eye(n_in, dtype=torch.float64).view(1, n_in, n_in, 1)
    weights = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[0, :, :, 0].T
    first = (weights > 0).to(torch.int64).argmax(1)
    padded = F.pad(weights, (0, 1))
    return first, padded.gather(1, first[:, None])[:, 0], padded.gather(1, first[:, None] + 1)[:, 0]


class _NeighbourDots(torch.autograd.Function):
    """Channel dot products of each pixel of z (N, H, W, D; channels last) with itself and with
    its right, lower and lower-right neighbours, and of its right with its lower neighbour:
    (5, N, H, W), zero past the edge. The backward is written out: autograd through the shifted
    slices would allocate and zero a full-size gradient for each of them."""

    @staticmethod
    def _shifted(z):
        h, w = z.shape[1:3]
        padded = F.pad(z, (0, 0, 0, 1, 0, 1))
        return padded, padded[:, :h, 1:], padded[:, 1:, :w], padded[:, 1:, 1:]

    @staticmethod
    def forward(ctx, z):
        z = z.contiguous()
        ctx.save_for_backward(z)
        _, right, down, diagonal = _NeighbourDots._shifted(z)
        return torch.stack([(z * z).sum(-1), (z * right).sum(-1), (z * down).sum(-1), (z * diagonal).sum(-1),
                            (right * down).sum(-1)])

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        h, w = z.shape[1:3]
        padded, right, down, diagonal = _NeighbourDots._shifted(z)
        g_self, g_right, g_down, g_diagonal, g_cross = grad.unsqueeze(-1)
        out = torch.zeros_like(padded)
        here, at_right, below, at_diagonal = out[:, :h, :w], out[:, :h, 1:], out[:, 1:, :w], out[:, 1:, 1:]
        for dst, g, other in ((here, 2 * g_self, z), (here, g_right, right), (here, g_down, down),
                              (here, g_diagonal, diagonal), (at_right, g_right, z), (at_right, g_cross, down),
                              (below, g_down, z), (below, g_cross, right), (at_diagonal, g_diagonal, z)):
            dst.addcmul_(g, other)
        return out[:, :h, :w]


def resized_sq_norm(z: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Squared norm over channels of each row of ``dense_rows(z, grid)``, (N, h, w), from the dot
    products of z's neighbouring pixels: each resized row mixes a 2 x 2 block with weights w_k,
    so its squared norm is the sum over pairs k, l of w_k w_l <z_k, z_l>."""
    dots = F.pad(_NeighbourDots.apply(z.permute(0, 2, 3, 1)), (0, 1, 0, 1))  # a clamped tap reads index H or W, weight 0
    (i, a0, a1), (j, b0, b1) = (bilinear_taps(n_in, n_out) for n_in, n_out in zip(z.shape[-2:], grid))
    i, j = i[:, None].to(z.device), j[None, :].to(z.device)
    a0, a1, b0, b1 = a0[:, None].to(z), a1[:, None].to(z), b0.to(z), b1.to(z)
    w00, w01, w10, w11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    sq, right, down, diagonal, cross = dots
    return (w00 ** 2 * sq[:, i, j] + w01 ** 2 * sq[:, i, j + 1] + w10 ** 2 * sq[:, i + 1, j]
            + w11 ** 2 * sq[:, i + 1, j + 1]
            + 2 * (w00 * w01 * right[:, i, j] + w10 * w11 * right[:, i + 1, j] + w00 * w10 * down[:, i, j]
                   + w01 * w11 * down[:, i, j + 1] + w00 * w11 * diagonal[:, i, j] + w01 * w10 * cross[:, i, j]))


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
        return self.global_(student_global), rows_to_map(self.dense(student_dense, grid=self.grid), n, self.grid)
