"""``phi-s``: PHI-S (Ranzinger et al., 2024) — rotate so every channel has the same variance.

With the calibration covariance ``Σ = U diag(λ) Uᵀ`` (eigh, float64) and ``m = mean(λ)``:

    tx = s · R · Uᵀ,    s = 1 / √m,

where R is orthogonal and spreads the eigenvalues evenly over the channels, so that the diagonal
of the normalised covariance ``tx Σ txᵀ = s² R diag(λ) Rᵀ`` is exactly 1 everywhere. This
equalises the channel variances; it does **not** whiten (the off-diagonals stay), and because
``tx`` is a rotation times one scalar, distances between features keep their geometry.

Choice of R:

* **Hadamard** (the paper's choice, used whenever ``hadamard(C)`` can build one): R = H, the
  normalised Hadamard matrix (entries ±1/√C). ``(H Λ Hᵀ)_ii = Σ_k H_ik² λ_k = m`` for every i,
  independent of the data. ``hadamard.py`` builds orders 2^k, Paley I/II and Kronecker products
  (768, 1280, 1312, 12, 20, 28, …).
* **Givens fallback** (data-dependent), for every other C. A real matrix whose entries all have
  magnitude 1/√C exists only for C = 1, 2 or a multiple of 4 (and ``hadamard.py`` does not reach
  every multiple of 4, e.g. 52 or 92), so for C = 6, odd C, etc. no Hadamard rotation exists. We
  use the classic constant-diagonal construction instead: starting from the eigenbasis (diagonal
  λ), apply C − 1 Givens rotations; each pairs the largest remaining channel (above m) with the
  smallest (below m) and picks the angle that puts the first at exactly m,
  ``cos²θ = (m − λ_lo) / (λ_hi − λ_lo)``; the partner takes ``λ_hi + λ_lo − m`` and stays in the
  pool. The trace is preserved, so the last channel ends at m too. Unlike H, this R depends on λ,
  but the normalised covariance has the same property (unit diagonal, not whitened).

Which one was used is in ``construction`` (e.g. ``"hadamard: sylvester(64) ⊗ paley1(q=11)"`` or
``"givens: no Hadamard matrix of order 6"``) and in the persistent buffer ``construction_id``
(0 unfitted, 1 Hadamard, 2 Givens), so a loaded checkpoint can report it.
"""
from __future__ import annotations

import torch

from .base import Normalizer, register
from .hadamard import hadamard, hadamard_construction

UNFITTED, HADAMARD, GIVENS = 0, 1, 2


def constant_diagonal_rotation(lam: torch.Tensor) -> torch.Tensor:
    """Orthogonal R (float64) with ``diag(R diag(lam) Rᵀ)`` equal to ``mean(lam)`` everywhere.

    C − 1 Givens rotations (see the module docstring); R's rows are the new channels expressed in
    the eigenbasis. Channels already at the mean are left alone, so the loop may stop early.
    """
    lam = lam.to(torch.float64)
    c = lam.shape[0]
    r = torch.eye(c, dtype=torch.float64, device=lam.device)
    d = lam.clone()
    m = d.mean()
    tol = 1e-15 * float(d.abs().max().clamp_min(1e-300))
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=lam.device)
    active = torch.ones(c, dtype=torch.bool, device=lam.device)
    for _ in range(c - 1):
        i = int(torch.where(active, d, -inf).argmax())
        j = int(torch.where(active, d, inf).argmin())
        hi, lo = d[i].item(), d[j].item()
        if hi - lo <= tol:
            break
        cos2 = min(max((m.item() - lo) / (hi - lo), 0.0), 1.0)
        cs, sn = cos2**0.5, (1.0 - cos2) ** 0.5
        ri, rj = r[i].clone(), r[j].clone()
        r[i] = cs * ri + sn * rj
        r[j] = cs * rj - sn * ri
        d[j] = hi + lo - m
        d[i] = m
        active[i] = False
    return r


@register("phi-s")
class PhiS(Normalizer):
    uses_eigenbasis = True

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps)
        self.register_buffer("construction_id", torch.tensor(UNFITTED, dtype=torch.uint8))

    def _solve(self, mean64: torch.Tensor, cov64: torch.Tensor) -> torch.Tensor:
        lam, u = torch.linalg.eigh(cov64)
        lam = lam.clamp_min(0)
        h = hadamard(self.channels)
        if h is not None:
            rot = h.to(cov64.device)
            self.construction_id.fill_(HADAMARD)
        else:
            rot = constant_diagonal_rotation(lam)
            self.construction_id.fill_(GIVENS)
        scale = 1.0 / lam.mean().sqrt().clamp_min(self.eps)
        return scale * rot @ u.T

    @property
    def construction(self) -> str:
        code = int(self.construction_id.item()) if self.is_fitted else UNFITTED
        if code == HADAMARD:
            how = hadamard_construction(self.channels)
            return f"hadamard: {how}" if how else "hadamard (order not built by this version)"
        if code == GIVENS:
            return f"givens: no Hadamard matrix of order {self.channels}"
        built = hadamard_construction(self.channels)
        return f"unfitted (identity); will use {'hadamard: ' + built if built else 'givens'}"
