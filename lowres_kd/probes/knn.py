"""k-nearest-neighbour classification on frozen global features, as DINO reports it.

Features are L2-normalised; each scored image takes the ``k`` fitted images of highest cosine
similarity, and each votes for its class with weight ``exp(cos / T)``; the class with the most
weight wins (ties: the lowest class index). On every classification set of ``probe.data``;
``probe.knn_k`` (20) and ``probe.knn_temperature`` (0.07) as in the papers.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import PROBES, ProbeContext, row

CHUNK = 1024  # scored images per similarity block (memory: CHUNK x fitted images)


def knn_predict(x_fit: torch.Tensor, y_fit: torch.Tensor, x_eval: torch.Tensor, k: int, temperature: float,
                num_classes: int) -> torch.Tensor:
    """The predicted class of each row of ``x_eval`` (float64 similarities; k clipped to the fitted count)."""
    a = F.normalize(x_fit.double(), dim=1)
    y_fit = torch.as_tensor(y_fit, dtype=torch.long)
    k = min(k, len(a))
    preds = []
    for b in F.normalize(x_eval.double(), dim=1).split(CHUNK):
        sims, idx = (b @ a.T).topk(k, dim=1)
        votes = torch.zeros(len(b), num_classes, dtype=torch.float64)
        # exp(cos / T) scaled by exp(-max cos / T) per row: the same winner, no overflow at a small T
        votes.scatter_add_(1, y_fit[idx], ((sims - sims[:, :1]) / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


@PROBES.register("knn")
def knn_probe(ctx: ProbeContext):
    p, rows = ctx.recipe.probe, []
    for split in ctx.probe_sets("classification"):
        for name in ctx.subjects:
            xtr = ctx.features(name, f"{split.name}/train", split.train_images, dense=False).global_
            xte = ctx.features(name, f"{split.name}/test", split.test_images, dense=False).global_
            pred = knn_predict(xtr, split.train_labels, xte, p.knn_k, p.knn_temperature, split.num_classes)
            acc = float(np.mean(pred.numpy() == split.test_labels))
            rows.append(row("knn", name, "accuracy", acc, dataset=split.name, k=min(p.knn_k, len(xtr)),
                            temperature=p.knn_temperature, n_train=len(xtr), n_test=len(xte)))
    return rows
