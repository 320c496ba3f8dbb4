"""The invertible affine normaliser every teacher's targets pass through (DESIGN §2.1).

``y = (x - mean) @ txᵀ`` and ``x = y @ inv_txᵀ + mean``, for rows ``(N, C)`` or maps
``(N, C, H, W)`` (channels on dim 1). ``mean``, ``tx``, ``inv_tx`` and ``fitted`` are persistent
buffers (they are saved in checkpoints); ``mean``/``tx``/``inv_tx`` are float32 and start as the
identity, so an unfitted normaliser passes features through unchanged.

Calibration: call ``update(x)`` on batches of teacher features (a map contributes every spatial
position as a sample), then ``fit()``. ``update`` keeps streaming float64 statistics (count, mean,
centred scatter matrix, merged batch by batch with Chan's formula, so a large mean does not cancel
the variance); they are non-persistent buffers, never in ``state_dict``. ``fit`` hands the float64
mean and unbiased covariance to the subclass's ``_solve(mean64, cov64) -> tx64`` and stores
``tx`` and its inverse (the inverse of the *stored* float32 ``tx``, computed in float64 and checked
finite).

Precision: computation is float32 (float64 for float64 inputs); the output has the input's dtype.
For float64 inputs ``inverse`` solves against ``tx`` instead of multiplying by the float32
``inv_tx``, so a float64 round trip is exact to float64 precision. ``module.half()`` or
``.to(torch.bfloat16)`` moves the buffers but never changes their dtype (see ``_apply``).

Shape:
    rows ``(N, C)`` or maps ``(N, C, H, W)``; the output has the input's shape.

Example::

    >>> norm = build_normalizer("phi-s", 768)
    >>> for feats in calibration_batches:
    ...     norm.update(feats)
    >>> norm.fit()
    >>> target = norm(feats)                 # zero mean, unit variance per channel
    >>> raw = norm.inverse(target)           # back in the teacher's space
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Tuple

import torch
from torch import nn

from ..registry import Registry

NORMALIZERS = Registry("normalizer")

_STAT_BUFFERS = ("_stat_n", "_stat_mean", "_stat_m2")
_UPDATE_CHUNK_ROWS = 1 << 16  # bounds the float64 copy made by update()


def register(name: str) -> Callable[[type], type]:
    """``@register("phi-s")``: adds the class to ``NORMALIZERS`` and records the name on it."""

    def wrap(cls: type) -> type:
        cls.kind = name
        return NORMALIZERS.register(name)(cls)

    return wrap


class Normalizer(nn.Module):
    """Invertible affine normaliser of C channels; subclasses supply ``_solve``.

    Args:
        channels: C, the feature width.
        eps: floor for variances/standard deviations when solving (dead channels).
    """

    kind: str = "normalizer"
    #: whether ``fit`` subtracts the calibration mean (False only for the identity ablation).
    centers: bool = True
    #: whether the transform mixes channels through the covariance's eigenbasis, so that a
    #: rank-deficient covariance (no more samples than channels) leaves part of it arbitrary.
    uses_eigenbasis: bool = False

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        if int(channels) < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = int(channels)
        self.eps = float(eps)
        c = self.channels
        self.register_buffer("mean", torch.zeros(c, dtype=torch.float32))
        self.register_buffer("tx", torch.eye(c, dtype=torch.float32))
        self.register_buffer("inv_tx", torch.eye(c, dtype=torch.float32))
        self.register_buffer("fitted", torch.tensor(False))
        for name in _STAT_BUFFERS:  # allocated by the first update()
            self.register_buffer(name, None, persistent=False)

    # ---------------------------------------------------------------- subclass hook

    def _solve(self, mean64: torch.Tensor, cov64: torch.Tensor) -> torch.Tensor:
        """Return the (C, C) float64 transform for this mean and (unbiased) covariance."""
        raise NotImplementedError

    # ---------------------------------------------------------------- layouts

    def _check(self, x: torch.Tensor, what: str) -> None:
        if x.dim() not in (2, 4) or x.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__}.{what}: expected rows (N, {self.channels}) or maps "
                f"(N, {self.channels}, H, W), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}.{what}: expected a floating tensor, got {x.dtype}")

    def _as_rows(self, x: torch.Tensor, what: str) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """(N, C) stays; (N, C, H, W) -> (N·H·W, C). Returns the rows and the function undoing it."""
        self._check(x, what)
        if x.dim() == 2:
            return x, lambda rows: rows
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        return rows, lambda out: out.reshape(n, h, w, c).permute(0, 3, 1, 2)

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    # ---------------------------------------------------------------- apply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise: ``(x - mean) @ txᵀ``."""
        rows, back = self._as_rows(x, "forward")
        dt = self._compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):  # fitted in fp32: applied in fp32
            out = (rows.to(dt) - self.mean.to(dt)) @ self.tx.to(dt).T
        return back(out.to(x.dtype))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Denormalise: ``y @ inv_txᵀ + mean`` (float64: a solve against ``tx``)."""
        rows, back = self._as_rows(y, "inverse")
        dt = self._compute_dtype(y)
        rows = rows.to(dt)
        if dt == torch.float64:
            out = torch.linalg.solve(self.tx.to(dt).T, rows, left=False)
        else:
            with torch.autocast(y.device.type, enabled=False):
                out = rows @ self.inv_tx.to(dt).T
        return back((out + self.mean.to(dt)).to(y.dtype))

    # ---------------------------------------------------------------- calibration

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Accumulate float64 statistics of a batch (rows, or maps: every position is a sample)."""
        rows, _ = self._as_rows(x.detach(), "update")
        if self._stat_n is None:
            dev, c = rows.device, self.channels
            self._stat_n = torch.zeros((), dtype=torch.float64, device=dev)
            self._stat_mean = torch.zeros(c, dtype=torch.float64, device=dev)
            self._stat_m2 = torch.zeros(c, c, dtype=torch.float64, device=dev)
        for chunk in rows.split(_UPDATE_CHUNK_ROWS):
            chunk = chunk.to(device=self._stat_m2.device, dtype=torch.float64)
            nb = chunk.shape[0]
            if nb == 0:
                continue
            mb = chunk.mean(0)
            centred = chunk - mb
            m2b = centred.T @ centred
            n = self._stat_n
            total = n + nb
            delta = mb - self._stat_mean
            self._stat_m2 += m2b + torch.outer(delta, delta) * (n * nb / total)
            self._stat_mean += delta * (nb / total)
            self._stat_n.fill_(total)

    def reset_stats(self) -> None:
        """Forget the calibration statistics (the fitted transform is kept)."""
        for name in _STAT_BUFFERS:
            setattr(self, name, None)

    @property
    def num_samples(self) -> int:
        """Rows seen by ``update`` since the last ``reset_stats``."""
        return 0 if self._stat_n is None else int(self._stat_n.item())

    def rank_note(self) -> Optional[str]:
        """Why this fit is not reproducible, or None: with n <= C samples the covariance has rank
        < C, and an eigenbasis-based transform rotates its null space as float rounding decides
        (valid, but another summation order, e.g. another batch size, gives another rotation)."""
        n, c = self.num_samples, self.channels
        if not self.uses_eigenbasis or n == 0 or n > c:
            return None
        return (f"{self.kind} fitted on {n} samples for {c} channels: the covariance is rank-deficient, so the "
                f"rotation of its null space is set by float rounding; more than {c} samples make it reproducible")

    @torch.no_grad()
    def fit(self) -> "Normalizer":
        """Compute ``mean``, ``tx``, ``inv_tx`` from the accumulated statistics; sets ``fitted``."""
        n = self.num_samples
        if n < 2:
            raise RuntimeError(f"{type(self).__name__}.fit: needs at least 2 samples from update(), has {n}")
        mean64 = self._stat_mean.clone()
        cov64 = self._stat_m2 / (n - 1)
        cov64 = 0.5 * (cov64 + cov64.T)
        tx64 = self._solve(mean64, cov64)
        c = self.channels
        if tuple(tx64.shape) != (c, c):
            raise RuntimeError(f"{type(self).__name__}._solve returned shape {tuple(tx64.shape)}, expected ({c}, {c})")
        tx32 = tx64.to(torch.float32)
        if not torch.isfinite(tx32).all():
            raise RuntimeError(f"{type(self).__name__}.fit: transform is not finite")
        inv64 = torch.linalg.inv(tx32.to(torch.float64))  # the inverse of what is stored
        if not torch.isfinite(inv64).all() or not torch.isfinite(inv64.to(torch.float32)).all():
            raise RuntimeError(f"{type(self).__name__}.fit: transform is not invertible")
        dev = self.mean.device
        self.mean.copy_((mean64 if self.centers else torch.zeros_like(mean64)).to(dev))
        self.tx.copy_(tx32.to(dev))
        self.inv_tx.copy_(inv64.to(dev))
        self.fitted.fill_(True)
        return self

    # ---------------------------------------------------------------- bookkeeping

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted.item())

    @property
    def construction(self) -> str:
        """How ``tx`` is built (for reports); subclasses with choices override it."""
        return self.kind

    def _apply(self, fn, recurse=True):
        # Buffers keep their dtype (float32 transform, float64 statistics) under .half(),
        # .to(bfloat16) or .double(); only the device follows the module.
        keep = {k: v for k, v in self._buffers.items() if v is not None and v.is_floating_point()}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            new = self._buffers[k]
            if new is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return f"channels={self.channels}, fitted={self.is_fitted}, construction={self.construction!r}"

    @classmethod
    def from_state_dict(cls, name: str, sd: Mapping[str, torch.Tensor], strict: bool = True) -> "Normalizer":
        """Rebuild a registered normaliser from its ``state_dict`` alone (C read from ``mean``)."""
        if "mean" not in sd:
            raise KeyError(f"normalizer state dict has no 'mean' (keys: {sorted(sd)})")
        module = NORMALIZERS.get(name)(channels=int(sd["mean"].shape[0]))
        module.load_state_dict(dict(sd), strict=strict)
        return module


def build_normalizer(name: str, channels: int, **kwargs) -> Normalizer:
    """``build_normalizer("phi-s", 768)``: an unfitted (identity) normaliser of that kind."""
    return NORMALIZERS.build(name, channels=channels, **kwargs)


__all__ = ["NORMALIZERS", "Normalizer", "build_normalizer", "register"]
