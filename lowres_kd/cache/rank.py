"""Rank-reduced cache targets (``cache.rank: r``): a PCA basis per teacher and kind.

Normalised targets are far from full rank (a teacher's 1280 channels carry most of their energy
in a few hundred directions), so a shard can hold r coefficients a row instead of C values. The
basis is fitted once per build on the normalised targets of the first ``cache.rank_images``
training views the cache holds (epoch 0's, then epoch 1's, ...), before any shard is written; ``basis.safetensors`` keeps, for each
cached teacher and kind (``global``, ``dense``) wider than r, the mean (C) and the top-r
eigenvectors (C, r)
of the targets' covariance, and the manifest its sha256. A kind no wider than r (HED's 6 dense
channels) is stored whole, and so is one fitted on no more than r rows (the global targets, one
row a view, under the default ``rank_images``): such a basis spans only the views it saw.
Training reconstructs a target as ``coefficients @ basis.T + mean``: one small matmul a batch.

Coefficients = (x - mean) @ basis. Each eigenvector's sign is fixed (its largest entry
positive) so that a refit on the same numbers gives the same file.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
from tqdm import tqdm

from ..errors import UserError
from ..teachers import TeacherSpec

BASIS = "basis.safetensors"
KINDS = ("global", "dense")


class RankTooLarge(UserError, ValueError):
    pass


def check_rank(rank: int, specs: Dict[str, TeacherSpec]) -> None:
    """``cache.rank`` must reduce something: be smaller than some cached teacher's width."""
    widths = {f"{name} {kind}": w for name, spec in specs.items()
              for kind, w in (("global", spec.global_dim), ("dense", spec.dense_dim))}
    widest = max(widths.values())
    if rank >= widest:
        raise RankTooLarge(f"cache.rank: {rank} is not smaller than any cached teacher's width (widths: "
                           + ", ".join(f"{k} {w}" for k, w in widths.items())
                           + f"); use less than {widest}, or null to store every channel")


def reduced(rank: Optional[int], width: int, rows: Optional[int] = None) -> bool:
    """Whether a kind of this width, its basis fitted on ``rows`` rows, is stored as coefficients:
    not when it is no wider than the rank (no fewer coefficients than channels), nor when the fit
    saw no more rows than the rank (the basis would span only those rows)."""
    return bool(rank) and width > rank and (rows is None or rows > rank)


def rows_of(kind: str, x: torch.Tensor) -> torch.Tensor:
    """A target tensor as rows of channels: global (N, C) as is, dense (N, C, h, w) one row a token."""
    return x if kind == "global" else x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class Moments:
    """Float64 sum and outer-product sum of rows: what a PCA basis is fitted from."""

    def __init__(self, channels: int):
        self.n = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.outer = torch.zeros(channels, channels, dtype=torch.float64)

        self._eig: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # of the rows so far

    def update(self, rows: torch.Tensor) -> None:
        r = rows.detach().to("cpu", torch.float64)
        self.n += r.shape[0]
        self.sum += r.sum(0)
        self.outer += r.T @ r
        self._eig = None

    def basis(self, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean (C), basis (C, rank)), fp32: the top-``rank`` principal directions."""
        mean = self.sum / self.n
        if self._eig is None:  # one eigendecomposition serves every rank
            cov = self.outer / self.n - torch.outer(mean, mean)
            values, vectors = torch.linalg.eigh(0.5 * (cov + cov.T))  # ascending
            self._eig = (values, vectors[:, torch.argsort(values, descending=True)])
        top = self._eig[1][:, :rank]
        sign = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
        return mean.float(), (top * sign).float().contiguous()


def project(x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Rows (..., C) -> coefficients (..., r)."""
    return (x - mean) @ basis


def reconstruct(coefficients: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Coefficients (..., r) -> rows (..., C)."""
    return coefficients @ basis.T + mean


@torch.no_grad()
def training_views(dataset, count: int, batch_size: int, epochs: int, first_epoch: int = 0) -> Iterator[torch.Tensor]:
    """Batches of the first ``count`` readable training views: epoch 0's images in order, then
    epoch 1's, ... up to ``epochs`` (the views a cache of that many epochs holds)."""
    batch, seen = [], 0
    for epoch in range(first_epoch, first_epoch + epochs):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            if seen >= count:
                break
            item = dataset[i]
            if not torch.is_tensor(item):  # unreadable: the shard marks it invalid, the basis skips it
                continue
            batch.append(item)
            seen += 1
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
    if batch:
        yield torch.stack(batch)


def fit_moments(normalised, batches: Iterable[torch.Tensor], names: Iterable[str],
                keep: Callable[[int], bool] = lambda width: True, progress: bool = True) -> Dict[str, Moments]:
    """``<kind>.<teacher>`` -> the moments of ``normalised(images)`` over ``batches``, for teachers
    ``names`` and kinds whose width ``keep`` accepts."""
    names = list(names)
    moments: Dict[str, Moments] = {}
    for images in tqdm(batches, desc="cache basis", unit="batch", disable=not progress, leave=False):
        for name, f in normalised(images).items():
            if name not in names:
                continue
            for kind, x in zip(KINDS, (f.global_, f.dense)):
                rows = rows_of(kind, x)
                if keep(rows.shape[1]):
                    moments.setdefault(f"{kind}.{name}", Moments(rows.shape[1])).update(rows)
    return moments


def fit_bases(normalised, batches: Iterable[torch.Tensor], rank: int, names: Iterable[str],
              progress: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Bases of teachers ``names`` from ``normalised(images)`` over ``batches``; returns the flat
    ``basis.safetensors`` dict and the rows each ``<kind>.<teacher>`` was fitted on."""
    moments = fit_moments(normalised, batches, names, lambda width: reduced(rank, width), progress)
    out: Dict[str, torch.Tensor] = {}
    for key, m in moments.items():
        if reduced(rank, m.sum.shape[0], m.n):
            out[f"{key}.mean"], out[f"{key}.basis"] = m.basis(rank)
    return out, {key: m.n for key, m in moments.items()}


def basis_of(bases: Optional[Dict[str, torch.Tensor]], kind: str, name: str):
    """(mean, basis) of one teacher and kind, or None where it is stored whole."""
    key = f"{kind}.{name}"
    if not bases or f"{key}.basis" not in bases:
        return None
    return bases[f"{key}.mean"], bases[f"{key}.basis"]
