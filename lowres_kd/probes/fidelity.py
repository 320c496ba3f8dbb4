"""Per-teacher fidelity: cosine of the student's adapted features and the teacher's, held out.

Held-out images: the first ``probe.fidelity_images`` of ``probe.images`` when set (a folder the
student never trained on), else of the first ``probe.data`` set's scored images. Cosine is
reported in the normalised space the loss works in (raw features of ReLU nets are all positive,
so a raw cosine is high for any prediction) and in the teacher's raw space.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PROBES, ProbeContext, row


def mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=1).mean())


def _held_out(ctx: ProbeContext):
    """(cache key, images): ``probe.images`` or the first probe set's scored images."""
    p = ctx.recipe.probe
    if p.images:
        return f"fidelity:{p.images}", ctx.source_images(p.images, p.fidelity_images)
    split = ctx.probe_sets()[0]
    return f"{split.name}/test[:{p.fidelity_images}]", split.test_images[:p.fidelity_images]


@PROBES.register("fidelity")
def fidelity_probe(ctx: ProbeContext):
    model = ctx.model
    key, images = _held_out(ctx)
    rows = []
    for name in model.heads:
        pred = ctx.features(f"student->{name}", key, images)
        target = ctx.features(f"teacher:{name}", key, images)
        for kind, a, b, norm in (("global", pred.global_, target.global_, model.norm_global[name]),
                                 ("dense", pred.dense, target.dense, model.norm_dense[name])):
            with torch.no_grad():
                na, nb = norm(a.to(ctx.device)), norm(b.to(ctx.device))
            rows.append(row("fidelity", name, f"cos_{kind}_normalised", mean_cos(na, nb), images=key))
            rows.append(row("fidelity", name, f"cos_{kind}_raw", mean_cos(a, b), images=key))
    return rows
