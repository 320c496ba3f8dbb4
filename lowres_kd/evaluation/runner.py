"""``lowres-kd probe RUN``: score the student, every teacher and two baselines, write the report.

Subjects: ``student`` (the trained run), ``student->name`` (its features adapted to teacher
``name`` through the heads, in that teacher's raw space), ``teacher:<name>`` (each teacher's own
features),
``student@init`` (the student's architecture and dense tap with the base weights, before any
training: separates what the tap gives from what training gives; a base quantized under the
adapter at its bits, as the student started) and ``scratch`` (the same architecture, random
weights). ``teacher:<base>`` is the base at full precision.

``sizes`` (``lowres-kd probe RUN --sizes 112,160,224``) scores every probe at each input size: the
probe images at that size, the student (and ``student@init`` / ``scratch``, its architecture)
running at it (a ViT's position table resampled), each teacher at its own input size.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from ..api import load
from ..build import student_backbone_config
from ..config import RecipeError, apply_overrides, probe_problems, recipe_from_dict
from ..device import resolve_device
from ..errors import UserError
from ..lowmem import quantize_teacher
from ..probes import PROBES, ProbeContext
from ..probes.base import JointSubjects, Subject
from ..provenance import environment
from ..rundir import checkpoint as ckpt
from ..teachers import Teacher, build_teacher
from .report import write_report

MIN_SIZE, MAX_SIZE = 32, 2048
REPO = Path(__file__).resolve().parents[2]  # the checkout, for the git sha of the scoring code


def _tapped(backbone: Teacher, input_size: int) -> Subject:
    return lambda x: backbone.student_features(backbone.preprocess(x, input_size))


def _student_at(model, size: int):
    """A copy of the trained model whose student runs at ``size`` px."""
    model = copy.deepcopy(model)
    model.student.body.set_input_size(size)
    model.student.input_size = size
    return model


def _backbone_at(backbone: Teacher, size: int) -> Teacher:
    """A copy of ``backbone`` taking ``size`` px images (the original keeps its own size)."""
    backbone = copy.deepcopy(backbone)
    backbone.set_input_size(size)
    return backbone


def build_subjects(model, teachers: Dict[str, Teacher], recipe, device: torch.device,
                   size: Optional[int] = None) -> Dict[str, Subject]:
    """Every subject; ``size``: the student and its two baselines run at that input size."""
    base = recipe.base_teacher
    if size is not None and size != model.student.input_size:
        model = _student_at(model, size)
    size = model.student.input_size
    subjects: Dict[str, Subject] = dict(JointSubjects(model).members())
    for name, teacher in teachers.items():
        subjects[f"teacher:{name}"] = teacher
    s, bits = recipe.student, recipe.student_base_bits
    if bits >= 16 and s.mode != "scratch" and not (s.family or s.model or s.weights):
        init = teachers[base.name]  # the student started as the base itself, loaded already
    else:  # its own backbone (student.family, model or weights), the base quantized, or scratch's
        init = build_teacher(student_backbone_config(recipe)).freeze()
        if bits < 16:
            quantize_teacher(init, bits, device=device)
        else:
            init = init.to(device)
    if size != init.spec.input_size:  # the teacher itself stays at its own size
        init = _backbone_at(init, size)
    subjects["student@init"] = _tapped(init, size)
    torch.manual_seed(recipe.train.seed)
    # the student's own architecture (a shipped base's model name resolved), random weights
    scratch = build_teacher(student_backbone_config(recipe, with_weights=False)).freeze().to(device)
    scratch.set_input_size(size)
    subjects["scratch"] = _tapped(scratch, size)
    return subjects


def check_sizes(sizes: List[int]) -> List[int]:
    bad = [s for s in sizes if not isinstance(s, int) or not MIN_SIZE <= s <= MAX_SIZE]
    if bad or not sizes or len(set(sizes)) != len(sizes):
        raise UserError(f"--sizes: {sizes} is not allowed; distinct integers from {MIN_SIZE} to {MAX_SIZE} "
                        "(pixels), e.g. 112,160,224")
    return sorted(sizes)


def run_probes(run_dir: str | Path, probes: Optional[List[str]] = None, device: str = "auto", progress: bool = True,
               data: Optional[List[str]] = None, images: Optional[str] = None,
               sizes: Optional[List[int]] = None, overrides: Optional[List[str]] = None) -> dict:
    """Run ``probes`` (default: the recipe's) over every subject; ``data`` replaces ``probe.data``
    and ``images`` ``probe.images`` of the run's recipe; ``sizes``: once at each input size, each
    row naming its ``image_size``, and ``resolution.png`` plots score against size; ``overrides``:
    ``probe.key=value`` settings for this scoring."""
    started = time.perf_counter()
    sizes = check_sizes(sizes) if sizes is not None else None
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    recipe = _recipe_of(run_dir, overrides or [])
    model = load(run_dir, dev)
    if data is not None or images is not None:
        recipe.probe = dataclasses.replace(recipe.probe, data=recipe.probe.data if data is None else list(data),
                                           images=recipe.probe.images if images is None else images)
    teachers = {t.name: build_teacher(t).freeze().to(dev) for t in recipe.teachers}
    rows, notes = [], []
    for size in sizes or [None]:
        subjects = build_subjects(model, teachers, recipe, dev, size)
        ctx = ProbeContext(recipe=recipe, model=model, teachers=teachers, subjects=subjects,
                           image_size=size or recipe.probe.image_size or recipe.data.image_size, device=dev,
                           progress=progress)
        for name in tqdm(probes or recipe.probe.probes, desc="probes" + (f" at {size} px" if size else ""),
                         disable=not progress):
            rows += [{**r, "image_size": size} if size else r for r in PROBES.get(name)(ctx)]
        notes += [n for n in ctx.notes if n not in notes]
    base = f"teacher:{recipe.base_teacher.name}"
    result = {"run": str(run_dir), "base": base, "recipe": recipe.to_dict(), "rows": rows, "notes": notes,
              "env": environment(dev, REPO), "seconds": round(time.perf_counter() - started, 1)}
    if sizes:
        result["sizes"] = sizes
    (run_dir / "probes.json").write_text(json.dumps(result, indent=1))
    write_report(run_dir, result)
    return result


def _recipe_of(run_dir: Path, overrides: Sequence[str] = ()):
    """The run's recipe as it trained, with ``probe.*`` overrides applied and checked."""
    not_probe = [o for o in overrides if not o.startswith("probe.")]
    if not_probe:
        raise RecipeError(f"--set {not_probe[0]}: only probe.* settings change when scoring a finished run "
                          "(its training is done)")
    _, meta = ckpt.read_dir(ckpt.checkpoint_dir(run_dir), [])
    recipe = recipe_from_dict(apply_overrides(copy.deepcopy(meta["recipe"]), list(overrides)), source=str(run_dir),
                              check_values=False)
    problems = probe_problems(recipe.probe) if overrides else []
    if problems:
        raise RecipeError(f"--set: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return recipe
