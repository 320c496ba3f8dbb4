"""Dense edge probe: a 1x1 linear map from frozen dense features to HED's edge map.

Fitted by ridge regression on alternate images and scored (R^2) on the others: the first
``probe.edge_images`` of ``probe.images`` (a folder the student never saw), or of the training
source when that is "".
Features are resized bilinearly to a fixed probe grid, so a coarse map is not excused: being
coarse is exactly what the probe measures.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PROBES, ProbeContext, batched, row

PROBE_GRID = 32
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # relative to the mean diagonal of X^T X
CV_FOLDS = 5  # folds of whole images, to pick the ridge on the fit images only


def _r2(y, pred) -> float:
    return float(1 - (y - pred).pow(2).sum() / (y - y.mean()).pow(2).sum())


def _design(x, mu, sd):
    return (x - mu) / sd


def _solve(gram, rhs, ridge):
    eye = torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge * gram.diagonal().mean() * eye, rhs)


def ridge_fit_score(x_fit, y_fit, x_eval, y_eval, rows_per_image: int) -> float:
    """Ridge regression y ~ x w + c (the intercept c = mean of y is not penalised): the ridge is
    chosen by cross-validation over folds of whole fit images, then refitted on all fit images
    and scored (R^2) on the held-out images (float64).

    Features are centred and scaled by one overall scale, not per channel: a channel that is
    almost silent on the fit images would otherwise be blown up and dominate on held-out ones."""
    mu = x_fit.mean(0)
    sd = (x_fit - mu).pow(2).mean().sqrt().clamp_min(1e-12)
    offset = y_fit.mean()
    y_fit = y_fit - offset
    a = _design(x_fit, mu, sd)
    gram, rhs = a.T @ a, a.T @ y_fit
    images = len(x_fit) // rows_per_image
    folds = torch.arange(images).chunk(min(CV_FOLDS, images))
    parts = []
    for fold in folds:
        rows = torch.cat([torch.arange(i * rows_per_image, (i + 1) * rows_per_image) for i in fold.tolist()])
        parts.append((rows, a[rows].T @ a[rows], a[rows].T @ y_fit[rows]))

    def cv_score(ridge):
        preds = torch.empty_like(y_fit)
        for rows, g, r in parts:
            preds[rows] = a[rows] @ _solve(gram - g, rhs - r, ridge)
        return _r2(y_fit, preds)

    best = max(RIDGES, key=cv_score)
    return _r2(y_eval, _design(x_eval, mu, sd) @ _solve(gram, rhs, best) + offset)


def to_rows(dense: torch.Tensor) -> torch.Tensor:
    dense = F.interpolate(dense, size=(PROBE_GRID, PROBE_GRID), mode="bilinear", align_corners=False)
    return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).double()


@PROBES.register("edges")
def edge_probe(ctx: ProbeContext):
    p = ctx.recipe.probe
    spec = p.images or ctx.recipe.data.source
    images = ctx.source_images(spec, p.edge_images)
    n = len(images)
    order = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])  # alternate images: fit / score
    images = images[order]
    edges = batched(ctx.hed().edge_map, images, ctx.device)
    target = F.adaptive_avg_pool2d(edges, PROBE_GRID).permute(0, 2, 3, 1).reshape(-1, 1).double()
    n_fit = (n + 1) // 2
    split = n_fit * PROBE_GRID * PROBE_GRID
    rows = []
    for name in ctx.subjects:
        x = to_rows(ctx.features(name, f"edges:{spec}", images).dense)
        r2 = ridge_fit_score(x[:split], target[:split], x[split:], target[split:], PROBE_GRID * PROBE_GRID)
        rows.append(row("edges", name, "r2", r2, images=spec, n_fit=n_fit, n_eval=n - n_fit, dense_dim=x.shape[1]))
    return rows
