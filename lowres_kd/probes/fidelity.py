"""Per-teacher fidelity: cosine of the student's adapted features and the teacher's, held out.

Held-out images are the labelled set's test images (never in the training source). Cosine is
reported in the normalised space the loss works in (raw features of ReLU nets are all positive,
so a raw cosine is high for any prediction) and in the teacher's raw space.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import load_labelled
from .base import PROBES, ProbeContext, adapted_subject, batched, images_to_tensor, row


def mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=1).mean())


@PROBES.register("fidelity")
def fidelity_probe(ctx: ProbeContext):
    p, model = ctx.recipe.probe, ctx.model
    split = load_labelled(p.labelled, n_train=10, n_test=max(10, p.fidelity_images), seed=ctx.recipe.train.seed + 1)
    images = images_to_tensor(split.test_images[:p.fidelity_images], ctx.image_size)
    rows = []
    for name in model.heads:
        pred = batched(adapted_subject(model, name), images, ctx.device)
        target = batched(ctx.teachers[name], images, ctx.device)
        for kind, a, b, norm in (("global", pred.global_, target.global_, model.norm_global[name]),
                                 ("dense", pred.dense, target.dense, model.norm_dense[name])):
            with torch.no_grad():
                na, nb = norm(a.to(ctx.device)), norm(b.to(ctx.device))
            rows.append(row("fidelity", name, f"cos_{kind}_normalised", mean_cos(na, nb)))
            rows.append(row("fidelity", name, f"cos_{kind}_raw", mean_cos(a, b)))
    return rows
