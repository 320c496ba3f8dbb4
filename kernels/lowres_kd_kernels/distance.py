"""Per-row distances between predicted and target features (DESIGN §2.3).

Each distance maps pred, target (N, C) to (N,), computed in float32 or wider; ``DISTANCES``
maps the name a caller passes (``distance="cos_smoothl1"``) to it, and the fused kernel
implements the same names.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict

import torch

DISTANCES: Dict[str, Callable[..., torch.Tensor]] = {}


def _register(name: str):
    def wrap(fn):
        DISTANCES[name] = fn
        return fn

    return wrap


def get_distance(name: str) -> Callable[..., torch.Tensor]:
    """The distance called ``name``; an unknown name raises with the closest known ones."""
    if name not in DISTANCES:
        close = difflib.get_close_matches(name, DISTANCES, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown distance {name!r}{hint} (known: {', '.join(sorted(DISTANCES))})")
    return DISTANCES[name]

COS_EPS = 1e-8  # each norm is clamped to this before dividing: zero rows give cos = 0, not NaN


def cosine_distance_rows(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cos(pred, target) per row, norms clamped at COS_EPS."""
    dot = (pred * target).sum(-1)
    norms = pred.norm(dim=-1).clamp_min(COS_EPS) * target.norm(dim=-1).clamp_min(COS_EPS)
    return 1.0 - dot / norms


def smooth_l1_rows(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean over channels of smoothL1_beta(pred - target); beta = 0 is plain L1."""
    diff = (pred - target).abs()
    if beta == 0:
        return diff.mean(-1)
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta).mean(-1)


@_register("cos_smoothl1")
def cos_smoothl1(pred, target, alpha: float = 0.5, beta: float = 1.0):
    """alpha * (1 - cos) + (1 - alpha) * smoothL1_beta: the default of DESIGN §2.3."""
    return alpha * cosine_distance_rows(pred, target) + (1.0 - alpha) * smooth_l1_rows(pred, target, beta)


@_register("cos")
def cos(pred, target, alpha: float = 0.5, beta: float = 1.0):
    """1 - cos only (alpha and beta ignored)."""
    return cosine_distance_rows(pred, target)


@_register("mse")
def mse(pred, target, alpha: float = 0.5, beta: float = 1.0):
    """Mean over channels of the squared error (alpha and beta ignored)."""
    return (pred - target).pow(2).mean(-1)
