"""``lowres-kd probe RUN``: score the student, every teacher and two baselines, write the report.

Subjects: ``student`` (the trained run), ``student->name`` (its features adapted to teacher
``name`` through the heads, in that teacher's raw space), ``teacher:<name>`` (each teacher's own
features),
``student@init`` (the student's architecture and dense tap with the base weights, before any
training: separates what the tap gives from what training gives) and ``scratch`` (the same
architecture, random weights).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from ..config import TeacherConfig
from ..teachers import Teacher, build_teacher
from .base import PROBES, ProbeContext, Subject, adapted_subject
from .report import write_report


def _tapped(backbone: Teacher, input_size: int) -> Subject:
    return lambda x: backbone.student_features(backbone.preprocess(x, input_size))


def build_subjects(model, teachers: Dict[str, Teacher], recipe, device: torch.device) -> Dict[str, Subject]:
    base = recipe.base_teacher
    size = model.student.input_size
    subjects: Dict[str, Subject] = {"student": model.student}
    for name in model.heads:
        subjects[f"student->{name}"] = adapted_subject(model, name)
    for name, teacher in teachers.items():
        subjects[f"teacher:{name}"] = teacher
    init = teachers[base.name] if recipe.student.mode != "scratch" else build_teacher(base).freeze().to(device)
    subjects["student@init"] = _tapped(init, size)
    torch.manual_seed(recipe.train.seed)
    scratch = build_teacher(TeacherConfig(**{**base.__dict__, "weights": "none"})).freeze().to(device)
    subjects["scratch"] = _tapped(scratch, size)
    return subjects


def run_probes(run_dir: str | Path, probes: Optional[List[str]] = None, device: str = "auto", progress: bool = True) -> dict:
    from ..api import load
    from ..training.trainer import resolve_device

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    model = load(run_dir, dev)
    recipe = _recipe_of(run_dir)
    teachers = {t.name: build_teacher(t).freeze().to(dev) for t in recipe.teachers}
    subjects = build_subjects(model, teachers, recipe, dev)
    ctx = ProbeContext(recipe=recipe, model=model, teachers=teachers, subjects=subjects,
                       image_size=recipe.probe.image_size or recipe.data.image_size, device=dev)
    rows = []
    for name in tqdm(probes or recipe.probe.probes, desc="probes", disable=not progress):
        rows += PROBES.get(name)(ctx)
    result = {"run": str(run_dir), "rows": rows, "notes": ctx.notes}
    (run_dir / "probes.json").write_text(json.dumps(result, indent=1))
    write_report(run_dir, result)
    return result


def _recipe_of(run_dir: Path):
    from ..api import _checkpoint_dir
    from ..config import recipe_from_dict
    from ..training import checkpoint as ckpt

    _, meta = ckpt.read_dir(_checkpoint_dir(run_dir), [])
    return recipe_from_dict(meta["recipe"], source=str(run_dir), check_values=False)
