"""The head's last linear layer fused with the distillation distance: the reference.

    loss = reduce_rows( w_i * d(H_i W^T + b, T_i) )

This plain PyTorch function is the CPU path, the test oracle of the Triton kernel in
``lowres_kd_kernels.linear_distill`` and the baseline of the kernel benchmark: there is no
second reference.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .distance import get_distance

REDUCTIONS = ("mean", "sum", "none")


def check_inputs(hidden, weight, bias, target, row_weight, reduction: str) -> None:
    """Shapes and reduction of the op, shared by the reference and the Triton kernel."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, K) and weight (C, K) must agree on K: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if target.shape != (hidden.shape[0], weight.shape[0]):
        raise ValueError(f"target must be (N, C) = {(hidden.shape[0], weight.shape[0])}, got {tuple(target.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (C,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if row_weight is not None and row_weight.shape != (hidden.shape[0],):
        raise ValueError(f"row_weight must be (N,) = ({hidden.shape[0]},), got {tuple(row_weight.shape)}")


def no_autocast(device: torch.device):
    """Autocast switched off, when it is on: the op and its reference compute in the dtypes they
    are given (autocast would recast their matmuls). A no-op on meta, which has no autocast (the
    planner runs both there)."""
    if device.type != "meta" and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def fused_linear_distill_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    row_weight: Optional[torch.Tensor] = None,
    alpha: float = 0.5,
    beta: float = 1.0,
    distance: str = "cos_smoothl1",
    reduction: str = "mean",
) -> torch.Tensor:
    """Distance of ``hidden @ weight.T + bias`` to ``target``, reduced over rows.

    Shape: hidden (N, K), weight (C, K), bias (C) or None, target (N, C), row_weight (N) or None.
    Computes in float32 at least (float64 inputs stay float64). ``mean`` divides by the sum of the
    row weights (N without them); rows of weight 0 (masked) contribute nothing, and an all-masked
    batch gives 0. ``none`` returns the weighted per-row distances (N,).
    """
    check_inputs(hidden, weight, bias, target, row_weight, reduction)
    compute = torch.promote_types(hidden.dtype, torch.float32)  # "float32 at least", also under autocast
    with no_autocast(hidden.device):
        pred = hidden.to(compute) @ weight.to(compute).T
        if bias is not None:
            pred = pred + bias.to(compute)
    return distill_loss_reference(pred, target, row_weight, alpha=alpha, beta=beta, distance=distance,
                                  reduction=reduction)


def distill_loss_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    row_weight: Optional[torch.Tensor] = None,
    alpha: float = 0.5,
    beta: float = 1.0,
    distance: str = "cos_smoothl1",
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss half of the reference: distance of a given projection ``pred`` (N, C) to ``target``,
    reduced over rows as ``fused_linear_distill_reference`` does, computing in float32 at least
    whatever dtype ``pred`` comes in. The reference calls it on its fp32 projection; a mixed-precision
    caller (the kernel benchmark's baseline) on a 16-bit one."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    compute = torch.promote_types(pred.dtype, torch.float32)
    with no_autocast(pred.device):
        rows = get_distance(distance)(pred.to(compute), target.to(compute), alpha=alpha, beta=beta)
        if row_weight is not None:
            rows = rows * row_weight.to(compute)
        if reduction == "none":
            return rows
        if reduction == "sum":
            return rows.sum()
        denom = (row_weight.to(compute).sum() if row_weight is not None
                 else torch.tensor(float(rows.numel()), dtype=compute, device=rows.device))
        return rows.sum() / denom.clamp_min(torch.finfo(compute).tiny)
