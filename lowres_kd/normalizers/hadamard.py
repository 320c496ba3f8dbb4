"""Normalised Hadamard matrices of many orders: Sylvester, Paley I/II and their Kronecker products.

``hadamard(n)`` returns an orthogonal ``n × n`` float64 matrix whose entries are all ``±1/√n``, or
``None`` when this module cannot build one. A real matrix like that exists only for n = 1, 2 or a
multiple of 4 (the Hadamard conjecture says for every multiple of 4; no construction is known for
some, the smallest being 668). The constructions searched here:

* **Sylvester** — order 2^k: ``H_{2m} = [[H_m, H_m], [H_m, -H_m]]``.
* **Paley I** — order q + 1 for a prime q ≡ 3 (mod 4): ``H = I + [[0, 1ᵀ], [-1, Q]]`` with Q the
  Jacobsthal matrix ``Q[i, j] = χ(j - i)`` (χ the quadratic character mod q; Q is antisymmetric).
* **Paley II** — order 2(q + 1) for a prime q ≡ 1 (mod 4): with the symmetric conference matrix
  ``S = [[0, 1ᵀ], [1, Q]]``, ``H = S ⊗ [[1, -1], [-1, -1]] + I ⊗ [[1, 1], [1, -1]]``.
* **Kronecker products** of the above: ``H_a ⊗ H_b`` is Hadamard of order a·b.

The search runs over the factorisations of n (memoised, a few thousand divisor pairs at most) and
keeps the plan with the fewest Paley factors, then the largest Sylvester part (all Sylvester factors
merge into one). Examples: 768 = sylvester(64) ⊗ paley1(q=11); 1280 = sylvester(64) ⊗ paley1(q=19);
1312 = sylvester(8) ⊗ paley1(q=163); 28 = paley2(q=13). Only primes q are used (not prime powers),
so e.g. order 92 (Williamson) is not reached: ``hadamard(92)`` is ``None``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

# A plan: (order of the merged Sylvester factor, sorted tuple of ("paley1" | "paley2", q)).
_Plan = Tuple[int, Tuple[Tuple[str, int], ...]]


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _direct(n: int) -> Optional[_Plan]:
    """A single-factor construction of order n, or None."""
    if n >= 1 and n & (n - 1) == 0:
        return (n, ())
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return (1, (("paley1", n - 1),))
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return (1, (("paley2", n // 2 - 1),))
    return None


def _score(plan: _Plan) -> Tuple[int, int]:
    return (len(plan[1]), -plan[0])


@functools.lru_cache(maxsize=None)
def _plan(n: int) -> Optional[_Plan]:
    if n < 1:
        return None
    if n & (n - 1) == 0:  # 1, 2, 4, 8, ...
        return (n, ())
    if n % 4:
        return None
    best = _direct(n)
    for a in range(2, math.isqrt(n) + 1):
        if n % a:
            continue
        pa, pb = _plan(a), _plan(n // a)
        if pa is None or pb is None:
            continue
        cand = (pa[0] * pb[0], tuple(sorted(pa[1] + pb[1])))
        if best is None or _score(cand) < _score(best):
            best = cand
    return best


def hadamard_construction(n: int) -> Optional[str]:
    """How ``hadamard(n)`` is built, e.g. ``"sylvester(64) ⊗ paley1(q=11)"``; None if it is not."""
    plan = _plan(n)
    if plan is None:
        return None
    parts = [f"sylvester({plan[0]})"] if plan[0] > 1 or not plan[1] else []
    parts += [f"{kind}(q={q})" for kind, q in plan[1]]
    return " ⊗ ".join(parts)


def _jacobsthal(q: int) -> torch.Tensor:
    residues = torch.zeros(q, dtype=torch.float64)
    residues[torch.tensor(sorted({(x * x) % q for x in range(1, q)}), dtype=torch.long)] = 1.0
    chi = 2.0 * residues - 1.0
    chi[0] = 0.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley1(q: int) -> torch.Tensor:
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = 1.0
    s[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(s, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> Optional[torch.Tensor]:
    """Normalised Hadamard matrix of order n (orthogonal, entries ±1/√n), or None.

    Example::

        >>> h = hadamard(12)
        >>> torch.allclose(h @ h.T, torch.eye(12, dtype=h.dtype))
        True
    """
    plan = _plan(int(n))
    if plan is None:
        return None
    h = _sylvester(plan[0])
    for kind, q in plan[1]:
        h = torch.kron(h, _paley1(q) if kind == "paley1" else _paley2(q))
    return (h / math.sqrt(n)).to(dtype)


__all__ = ["hadamard", "hadamard_construction"]
