"""lowres-kd-kernels: a linear layer fused with a distillation distance, in Triton, and its
PyTorch reference; ``fused_linear_distill`` / ``FusedLinearDistill`` choose between them.

Importing this package needs neither Triton nor CUDA: Triton is imported only when a Triton
backend is chosen, and the module that defines the ``@triton.jit`` kernels only then. It
depends on torch (and, for the kernels, triton) alone.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import nn

from .distance import COS_EPS, DISTANCES, cos_smoothl1, cosine_distance_rows, get_distance, smooth_l1_rows
from .reference import REDUCTIONS, check_inputs, distill_loss_reference, fused_linear_distill_reference, no_autocast

BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["BACKENDS", "COS_EPS", "DISTANCES", "REDUCTIONS", "FusedLinearDistill", "check_inputs", "cos_smoothl1",
           "cosine_distance_rows", "distill_loss_reference", "fused_linear_distill", "fused_linear_distill_reference", "get_distance",
           "no_autocast", "smooth_l1_rows", "triton_import_error", "triton_usable"]


def triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton cannot be imported ({type(exc).__name__}: {exc}); install the 'gpu' extra"
    return None


def triton_usable() -> Tuple[bool, str]:
    """(usable, reason): Triton imports, and either CUDA is available or ``TRITON_INTERPRET=1``
    is set (Triton's CPU interpreter; it must be set before the kernel modules are imported)."""
    err = triton_import_error()
    if err is not None:
        return False, err
    if torch.cuda.is_available():
        return True, "triton with CUDA"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, "triton interpreter (TRITON_INTERPRET=1, CPU)"
    return False, ("no CUDA device and TRITON_INTERPRET is not set to 1 (set it before importing "
                   "lowres_kd_kernels.linear_distill to run the kernels on CPU, slowly)")


def _resolve_backend(backend: str, hidden, weight, bias, target, row_weight) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        ok, why = triton_usable()
        if not ok:
            raise RuntimeError(f"backend='triton' is unusable: {why}. Use backend='torch' or 'auto'.")
        return "triton"
    # auto: the kernel only where it pays off and is known to work: CUDA tensors, kernel dtypes.
    params = [t for t in (hidden, weight, bias) if t is not None]
    tensors = params + [t for t in (target, row_weight) if t is not None]
    if not all(t.is_cuda for t in tensors) or not all(t.dtype in _TRITON_DTYPES for t in params):
        return "torch"
    return "triton" if triton_usable()[0] else "torch"


def fused_linear_distill(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    row_weight: Optional[torch.Tensor] = None,
    alpha: float = 0.5,
    beta: float = 1.0,
    distance: str = "cos_smoothl1",
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """``reduce_i(w_i * d(hidden_i @ weight.T + bias, target_i))``: the head's last linear fused
    with the distillation distance.

    backend: ``"torch"`` the reference (``fused_linear_distill_reference``),
    ``"triton"`` the chunked fused kernel (``lowres_kd_kernels.linear_distill``; raises
    when Triton is unusable, see ``triton_usable``), ``"auto"`` the kernel for CUDA tensors of
    fp32/bf16/fp16 when Triton is usable, the reference otherwise.
    """
    if _resolve_backend(backend, hidden, weight, bias, target, row_weight) == "torch":
        return fused_linear_distill_reference(hidden, weight, bias, target, row_weight, alpha=alpha, beta=beta,
                                              distance=distance, reduction=reduction)
    from .linear_distill import fused_linear_distill_triton  # first use: compiles/defines the kernel

    return fused_linear_distill_triton(hidden, weight, bias, target, row_weight, alpha=alpha, beta=beta,
                                       distance=distance, reduction=reduction)


class FusedLinearDistill(nn.Module):
    r"""Distillation loss of a head's last linear layer, without materialising its output.

    .. math::
        P = H W^\top + b, \qquad
        \mathcal{L} = \operatorname{reduce}_i\big(w_i\, d(P_i, T_i)\big), \qquad
        d(p, t) = \alpha\,(1 - \cos(p, t)) + (1 - \alpha)\,\tfrac{1}{C}\textstyle\sum_c
        \operatorname{smoothL1}_\beta(p_c - t_c)

    (``distance="cos"``: :math:`1 - \cos`; ``"mse"``: mean squared error). ``mean`` divides by
    :math:`\sum_i w_i` (N without row weights; an all-masked batch gives 0), ``sum`` sums,
    ``none`` returns the weighted per-row distances.

    Shape:
        - hidden: (N, K); linear: ``nn.Linear(K, C)``; target: (N, C); row_weight: (N) or None
        - output: scalar, or (N) for ``reduction="none"``; float32 (float64 for float64 inputs
          on the torch backend)

    Example::

        >>> head = nn.Linear(768, 1024)
        >>> loss_fn = FusedLinearDistill(alpha=0.5, beta=1.0)
        >>> h, t = torch.randn(4096, 768, requires_grad=True), torch.randn(4096, 1024)
        >>> loss = loss_fn(h, head, t)        # backend="auto": the reference on CPU
        >>> loss.backward()
    """

    def __init__(self, alpha: float = 0.5, beta: float = 1.0, distance: str = "cos_smoothl1",
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.alpha, self.beta, self.distance, self.reduction, self.backend = alpha, beta, distance, reduction, backend

    def forward(self, hidden: torch.Tensor, linear: nn.Linear, target: torch.Tensor,
                row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        # an fp32 head under autocast goes in as it is: the op casts a copy for its matmuls and
        # returns fp32 gradients, with no cast node in the autograd graph
        return fused_linear_distill(hidden, linear.weight, linear.bias, target, row_weight, alpha=self.alpha,
                                    beta=self.beta, distance=self.distance, reduction=self.reduction,
                                    backend=self.backend)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, distance={self.distance!r}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
