"""How close a low-memory teacher's features are to the full-precision teacher's (DESIGN §3).

Why: a quantized teacher that drifts teaches the student the drift. The recipe sets a minimum
cosine; ``check_fidelity`` fails loudly below it and says which bit width to try next.

Metrics, with ``a`` the candidate's features and ``b`` the reference's:

- cosine: global, mean over rows of cos(a_i, b_i); dense (N, C, h, w), mean over all N·h·w tokens
  of the cosine along C;
- relative error: ||a − b|| / ||b|| (Frobenius norm over the whole tensor).

Optionally in a normalised space: a ``(global_norm, dense_norm)`` pair of callables (e.g. the
teacher's fitted normalisers) is applied to both sides first. Raw features of ReLU networks are
all positive, so raw cosines sit high for nearly anything; the normalised space is where the loss
works. Metrics are computed in float64 whatever the features' dtype.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..teachers.base import Features
from .tensors import module_device

NEXT_BITS = {4: 8, 8: 16}
Normalisers = Tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


class FidelityError(RuntimeError):
    """A low-memory teacher's features are further from the full-precision ones than allowed."""


@dataclass
class FidelityReport:
    cos_global: float
    cos_dense: float
    rel_err_global: float
    rel_err_dense: float
    images: int
    normalised: bool

    @property
    def cos_min(self) -> float:
        """The smaller of the two cosines: the number a threshold is checked against."""
        return min(self.cos_global, self.cos_dense)

    def as_dict(self) -> dict:
        return {**asdict(self), "cos_min": self.cos_min}


def _features(model, images: torch.Tensor, batch_size: Optional[int]) -> Features:
    if isinstance(model, Features):
        return model
    if hasattr(model, "eval"):
        model.eval()
    device = module_device(model) if isinstance(model, torch.nn.Module) else images.device
    step = batch_size or images.shape[0]
    outs = []
    with torch.no_grad():
        for i in range(0, images.shape[0], step):
            f = model(images[i:i + step].to(device))
            outs.append(Features(f.global_.detach(), f.dense.detach()))
    return Features(torch.cat([o.global_ for o in outs]), torch.cat([o.dense for o in outs]))


def _normalise(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a normaliser (in fp32) where it lives: a module holding tensors on their device, else where ``x`` is."""
    if isinstance(fn, torch.nn.Module):
        tensors = list(fn.parameters()) + list(fn.buffers())
        if tensors:
            x = x.to(tensors[0].device)
    with torch.no_grad():
        return fn(x.float())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float("inf") if float(a.norm()) > 0 else 0.0


def teacher_fidelity(reference, candidate, images: Optional[torch.Tensor] = None,
                     normalisers: Optional[Normalisers] = None, batch_size: Optional[int] = None) -> FidelityReport:
    """Compare ``candidate``'s features with ``reference``'s on ``images``.

    ``reference`` / ``candidate``: a teacher (any module returning ``Features`` on images in
    [0, 1]; run under ``no_grad`` on its own device, an offloaded one included) or ``Features``
    computed beforehand (then ``images`` may be omitted for that side). ``normalisers``: optional
    ``(global_norm, dense_norm)`` applied to both sides (dense as (N, C, h, w)).

    Example::

        report = teacher_fidelity(fp32_teacher, quantized_teacher, calibration_images)
        check_fidelity(report, min_fidelity=0.97, teacher_name="dinov2", bits=4)
    """
    if images is None and not (isinstance(reference, Features) and isinstance(candidate, Features)):
        raise ValueError("teacher_fidelity needs images unless both sides are precomputed Features")
    ref = _features(reference, images, batch_size)
    cand = _features(candidate, images, batch_size)
    if ref.global_.shape != cand.global_.shape or ref.dense.shape != cand.dense.shape:
        raise ValueError(f"feature shapes differ: reference global {tuple(ref.global_.shape)} dense {tuple(ref.dense.shape)}, "
                         f"candidate global {tuple(cand.global_.shape)} dense {tuple(cand.dense.shape)}")
    if normalisers is not None:
        norm_g, norm_d = normalisers
        ref = Features(_normalise(norm_g, ref.global_), _normalise(norm_d, ref.dense))
        cand = Features(_normalise(norm_g, cand.global_), _normalise(norm_d, cand.dense))
    ag, bg = cand.global_.double().cpu(), ref.global_.double().cpu()
    ad, bd = cand.dense.double().cpu(), ref.dense.double().cpu()
    return FidelityReport(
        cos_global=float(F.cosine_similarity(ag, bg, dim=1).mean()),
        cos_dense=float(F.cosine_similarity(ad, bd, dim=1).mean()),  # along C, mean over every token
        rel_err_global=_rel(ag, bg), rel_err_dense=_rel(ad, bd),
        images=int(bg.shape[0]), normalised=normalisers is not None)


def check_fidelity(report: FidelityReport, min_fidelity: float, teacher_name: str, bits: int) -> FidelityReport:
    """Raise :class:`FidelityError` when the smaller cosine is below ``min_fidelity``; else return the report."""
    if report.cos_min >= min_fidelity:
        return report
    nxt = NEXT_BITS.get(bits)
    advice = (f"try bits={nxt} for this teacher" if nxt else
              "it is already at full precision: lower the threshold or check the teacher and the reference")
    space = "normalised" if report.normalised else "raw"
    raise FidelityError(
        f"teacher {teacher_name!r} at {bits} bits: feature cosine {report.cos_min:.4f} (global {report.cos_global:.4f}, "
        f"dense {report.cos_dense:.4f}, {space} space, {report.images} images) is below min_fidelity={min_fidelity}; "
        f"{advice}")
