"""Linear segmentation on the frozen dense map, as the agglomerative-model papers report it
(ADE20k / VOC style): a 1x1 linear classifier on the dense features, its logits upsampled
bilinearly to the mask size, trained with cross-entropy (ignore index 255) for a fixed number
of full-batch Adam steps from zero weights, scored by mIoU and pixel accuracy on held-out images.

Features are standardised per channel with the fitted images' statistics; a map finer than
``GRID`` x ``GRID`` is average-pooled to it first, and the loss is taken on masks nearest-resized
to at most ``FIT_MASK`` x ``FIT_MASK`` (cost: 6x fewer pixels at 160 px); scoring is at the masks'
full resolution. mIoU
is the mean over classes present in the scored masks or the predictions (IoU = TP / (TP + FP +
FN)); ignored pixels count nowhere. On every segmentation set of ``probe.data``.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..data.folders import IGNORE_INDEX
from .base import PROBES, ProbeContext, row

GRID = 32
FIT_MASK = 64
LR = 0.05
EVAL_CHUNK = 16  # images per prediction block


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted; ignored pixels left out."""
    keep = target != IGNORE_INDEX
    t, p = target[keep].astype(np.int64), pred[keep].astype(np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(conf: np.ndarray) -> Tuple[float, float]:
    """(mIoU over the classes present, pixel accuracy) of a confusion matrix."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()), float(tp.sum() / max(conf.sum(), 1))


def _logits(x, weight, bias, size):
    out = torch.einsum("nchw,kc->nkhw", x, weight) + bias[:, None, None]
    return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def fit_score(x_fit: torch.Tensor, m_fit: torch.Tensor, x_eval: torch.Tensor, m_eval: torch.Tensor,
              num_classes: int, steps: int) -> Tuple[float, float]:
    """Fit the 1x1 classifier on dense maps ``x_fit`` (N, C, h, w) and masks ``m_fit`` (N, H, W);
    (mIoU, pixel accuracy) on ``x_eval`` / ``m_eval``."""
    if max(x_fit.shape[-2:]) > GRID:
        x_fit, x_eval = (F.adaptive_avg_pool2d(x, (min(GRID, x.shape[-2]), min(GRID, x.shape[-1])))
                         for x in (x_fit, x_eval))
    mu = x_fit.mean((0, 2, 3), keepdim=True)
    sd = x_fit.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    x_fit, x_eval = (x_fit - mu) / sd, (x_eval - mu) / sd
    weight = torch.zeros(num_classes, x_fit.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=LR)
    if max(m_fit.shape[-2:]) > FIT_MASK:  # the loss on a coarser copy of the masks (cost); scored at full size
        m_fit = F.interpolate(m_fit[:, None].float(), size=(min(FIT_MASK, m_fit.shape[-2]), min(FIT_MASK, m_fit.shape[-1])),
                              mode="nearest")[:, 0]
    target = m_fit.long()
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(_logits(x_fit, weight, bias, m_fit.shape[-2:]), target, ignore_index=IGNORE_INDEX)
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = torch.cat([_logits(x, weight, bias, m_eval.shape[-2:]).argmax(1) for x in x_eval.split(EVAL_CHUNK)])
    return scores(confusion(pred.numpy(), m_eval.numpy(), num_classes))


@PROBES.register("segmentation")
def segmentation_probe(ctx: ProbeContext):
    rows = []
    for split in ctx.probe_sets("segmentation"):
        masks = [torch.from_numpy(m) for m in (split.train_masks, split.test_masks)]
        for name in ctx.subjects:
            x_fit = ctx.features(name, f"{split.name}/train", split.train_images).dense
            x_eval = ctx.features(name, f"{split.name}/test", split.test_images).dense
            miou, acc = fit_score(x_fit, masks[0], x_eval, masks[1], split.num_classes, ctx.recipe.probe.segmentation_steps)
            extra = dict(dataset=split.name, n_train=len(x_fit), n_test=len(x_eval), classes=split.num_classes)
            rows += [row("segmentation", name, "miou", miou, **extra),
                     row("segmentation", name, "pixel_accuracy", acc, **extra)]
    return rows
