"""What every probe gets: the run, its subjects (feature extractors) and shared helpers.

A probe is one registered function ``probe(ctx) -> list of result rows``; a row is a dict with
at least ``probe``, ``subject``, ``metric`` and ``value``. Subjects are callables mapping RGB
images in [0, 1] to ``Features``; every probe scores all of them with the same frozen features.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List

import numpy as np
import torch

from ..config import Recipe
from ..registry import Registry
from ..teachers import Features, Teacher

PROBES = Registry("probe")

Subject = Callable[[torch.Tensor], Features]


@dataclass
class ProbeContext:
    recipe: Recipe
    model: torch.nn.Module  # the trained InheritedModel
    teachers: Dict[str, Teacher]  # every teacher of the recipe, with its own weights
    subjects: Dict[str, Subject]
    image_size: int
    device: torch.device
    notes: List[str] = field(default_factory=list)

    def hed(self) -> Teacher:
        """The edge teacher of the recipe, or the shipped HED when the recipe has none."""
        for t in self.teachers.values():
            if t.spec.family == "hed":
                return t
        if "_hed" not in self.teachers:
            from ..config import TeacherConfig
            from ..teachers import build_teacher

            self.teachers["_hed"] = build_teacher(TeacherConfig(name="_hed", family="hed")).freeze().to(self.device)
        return self.teachers["_hed"]


def adapted_subject(model, name: str) -> Subject:
    """The student's features adapted to teacher ``name``, in that teacher's raw space."""
    def run(images: torch.Tensor) -> Features:
        out = model(images)["teachers"][name]
        return Features(out["global"], out["dense"])

    return run


def images_to_tensor(images: np.ndarray | List, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) or a list of (3, H, W) tensors -> float (N, 3, size, size) in [0, 1]."""
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    else:
        x = torch.stack(list(images))
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], object], images: torch.Tensor, device: torch.device, batch_size: int = 32):
    """Apply ``fn`` to ``images`` in batches; concatenates tensors / Features on the CPU."""
    outs = [fn(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    if isinstance(outs[0], Features):
        return Features(torch.cat([o.global_.float().cpu() for o in outs]), torch.cat([o.dense.float().cpu() for o in outs]))
    return torch.cat([o.float().cpu() for o in outs])


def row(probe: str, subject: str, metric: str, value: float, **extra) -> dict:
    return {"probe": probe, "subject": subject, "metric": metric, "value": float(value), **extra}
