"""What every probe gets: the run, its subjects (feature extractors) and shared helpers.

A probe is one registered function ``probe(ctx) -> list of result rows``; a row is a dict with
at least ``probe``, ``subject``, ``metric`` and ``value``. Subjects are callables mapping RGB
images in [0, 1] to ``Features``; every probe scores all of them with the same frozen features.

The context loads the labelled sets of ``probe.data`` once and computes each subject's features on
a set once (``ctx.features``, keyed by subject, set and image size): the linear and knn probes
share one pass over the classification images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ..data import EvalTransform, build_source, load_probe_set, recipe_sources
from ..data.probe_sets import Split
from ..registry import Registry
from ..schema import Recipe, TeacherConfig
from ..teachers import Features, Teacher, build_teacher

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
    progress: bool = False  # tqdm bars while features are computed
    _features: Dict[Tuple[str, str, int], Features] = field(default_factory=dict, repr=False)
    _sets: Optional[List[Split]] = field(default=None, repr=False)

    def probe_sets(self, kind: Optional[str] = None) -> List[Split]:
        """The sets of ``probe.data`` (of one kind, ``classification`` / ``segmentation``, when
        given), in the recipe's order, loaded once."""
        if self._sets is None:
            p = self.recipe.probe
            self._sets = [load_probe_set(spec, p, self.image_size, self.recipe.train.seed) for spec in p.data]
            self.notes += [f"probe data {s.name}: {s.note}" for s in self._sets if s.note]
        return [s for s in self._sets if kind is None or s.kind == kind]

    def features(self, subject: str, key: str, images, dense: bool = True) -> Features:
        """``subject``'s features of ``images`` (uint8 (N, H, W, 3) or float (N, 3, H, W)), computed
        once per (subject, key, size) in batches; ``dense=False`` keeps the global ones only
        (``dense`` is then None), so a large classification set costs no dense maps."""
        k = (subject, key, self.image_size)
        have = self._features.get(k)
        if have is None or dense and have.dense is None:
            fn = self.subjects[subject]
            joint = isinstance(fn, JointMember)
            got = batched(fn.joint if joint else fn, images, self.device, size=self.image_size, dense=dense,
                          desc=f"{'student, student->*' if joint else subject} on {key}", progress=self.progress)
            for name, feats in (got.items() if joint else [(subject, got)]):
                if name in self.subjects:
                    self._features[(name, key, self.image_size)] = feats
            have = self._features[k]
        return have

    def source_images(self, spec: str, n: int) -> torch.Tensor:
        """The first ``n`` images of an image source (``embedded``, a folder, or ``holdout``: the
        recipe's ``data.holdout`` images of its ``data.source``), centre-cropped."""
        if spec == "holdout":
            _, source = recipe_sources(self.recipe.data)
        else:
            source = build_source(spec, fashion_mnist=0)
        transform = EvalTransform(self.image_size)
        return torch.stack([transform(source.load(i)) for i in range(min(n, len(source)))])

    def hed(self) -> Teacher:
        """The edge teacher of the recipe, or the shipped HED when the recipe has none."""
        for t in self.teachers.values():
            if t.spec.family == "hed":
                return t
        if "_hed" not in self.teachers:
            self.teachers["_hed"] = build_teacher(TeacherConfig(name="_hed", family="hed")).freeze().to(self.device)
        return self.teachers["_hed"]


class JointSubjects:
    """The trained student and its features adapted to every teacher (``student->name``): one
    ``model(images)`` call computes them all, so their features are computed together."""

    def __init__(self, model):
        self.model = model

    def __call__(self, images: torch.Tensor) -> Dict[str, Features]:
        out = self.model(images)
        feats = {"student": Features(out["global"], out["dense"])}
        feats.update({f"student->{n}": Features(o["global"], o["dense"]) for n, o in out["teachers"].items()})
        return feats

    def members(self) -> Dict[str, "JointMember"]:
        return {n: JointMember(self, n) for n in ["student", *(f"student->{t}" for t in self.model.heads)]}


@dataclass(frozen=True)
class JointMember:
    """One subject of a ``JointSubjects`` group, callable on its own."""
    joint: JointSubjects
    name: str

    def __call__(self, images: torch.Tensor) -> Features:
        return self.joint(images)[self.name]


def images_to_tensor(images: np.ndarray | List, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) or a list of (3, H, W) tensors -> float (N, 3, size, size) in [0, 1]."""
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    else:
        x = torch.stack(list(images))
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _to_cpu(out, dense: bool):
    if isinstance(out, dict):
        return {k: _to_cpu(v, dense) for k, v in out.items()}
    if isinstance(out, Features):
        return Features(out.global_.float().cpu(), out.dense.float().cpu() if dense else None)
    return out.float().cpu()


def _concat(outs: list):
    first = outs[0]
    if isinstance(first, dict):
        return {k: _concat([o[k] for o in outs]) for k in first}
    if isinstance(first, Features):
        dense = torch.cat([o.dense for o in outs]) if first.dense is not None else None
        return Features(torch.cat([o.global_ for o in outs]), dense)
    return torch.cat(outs)


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], object], images, device: torch.device, batch_size: int = 32,
            size: int = 0, dense: bool = True, desc: Optional[str] = None, progress: bool = False):
    """Apply ``fn`` to ``images`` in batches (each resized to ``size`` by ``images_to_tensor``
    when given); concatenates its tensors, Features or dicts of them on the CPU (dense maps only
    when ``dense``)."""
    outs = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        x = images[i:i + batch_size]
        outs.append(_to_cpu(fn((images_to_tensor(x, size) if size else x).to(device)), dense))
    return _concat(outs)


def row(probe: str, subject: str, metric: str, value: float, **extra) -> dict:
    return {"probe": probe, "subject": subject, "metric": metric, "value": float(value), **extra}
