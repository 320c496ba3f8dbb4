"""What a recipe builds: the student, the frozen teachers, the inherited model, the training
images. The trainer, the cache, the planner and ``lowres_kd.load`` all build through here."""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence

import torch

from .data import EvalTransform, ImageSource, TrainImages, TrainTransform, recipe_sources
from .lowmem import move_to, quantize_teacher
from .model import InheritedModel, Student
from .schema import Recipe, TeacherConfig
from .teachers import Teacher, TeacherSpec, build_teacher, default_model


def student_backbone_config(recipe: Recipe, with_weights: bool = True) -> TeacherConfig:
    """The student backbone as a teacher entry: the base teacher's, with ``student.family``,
    ``student.model``, ``student.weights`` and ``student.input_size`` in their place where set (a
    token model is built for the size it will see). Under an adapter the size stays the base's:
    the adapter-disabled student is the base teacher, at its own size."""
    base, s = recipe.base_teacher, recipe.student
    same_family = s.family in ("", base.family)
    weights = (s.weights or base.weights) if with_weights else "none"
    model = s.model or (default_model(base) if same_family else "")  # another family: its own default model
    size = base.input_size if s.mode == "adapter" else (s.input_size or base.input_size)
    return TeacherConfig(**{**base.__dict__, "family": s.family or base.family, "model": model,
                            "weights": weights, "input_size": size, "bits": 16, "offload": False})


def build_student(recipe: Recipe, load_weights: bool = True) -> Student:
    """The student; with ``load_weights=False`` (or in scratch mode) from random weights. In
    adapter mode with the base teacher at 8 or 4 bits, the frozen base's linears are quantized
    (on the CPU: move the model with ``lowmem.move_to``) before the adapter wraps them."""
    with_weights = load_weights and recipe.student.mode != "scratch"
    backbone = build_teacher(student_backbone_config(recipe, with_weights))
    bits = recipe.student_base_bits
    quantization = quantize_teacher(backbone, bits) if bits < 16 else None
    return Student(backbone, recipe.student, quantization)


def build_teachers(recipe: Recipe, names: Optional[Sequence[str]] = None) -> Dict[str, Teacher]:
    """The teachers ``names`` (default: all) but the one inside the student, with their weights, frozen."""
    return {t.name: build_teacher(t).freeze() for t in recipe.teachers
            if (names is None or t.name in names) and not recipe.inside_student(t)}


def build_student_and_teachers(recipe: Recipe, load_weights: bool = True, names: Optional[Sequence[str]] = None):
    """``(student, teachers)``: the teachers ``names`` (default: all; the live ones when training
    from a cache, the cached ones when building it); ``load_weights=False`` (a model to receive
    a checkpoint) builds no teacher."""
    student = build_student(recipe, load_weights)
    return student, build_teachers(recipe, names) if load_weights else {}


def teacher_specs(recipe: Recipe, student: Student, teachers: Dict[str, Teacher],
                  names: Optional[Sequence[str]] = None) -> Dict[str, TeacherSpec]:
    """The spec of every teacher ``names`` (default: all): the student's own body for the one
    inside it, else the built teacher's."""
    return {t.name: student.body.spec if recipe.inside_student(t) else teachers[t.name].spec for t in recipe.teachers
            if names is None or t.name in names}


def build_model(recipe: Recipe, student: Student, specs: Dict[str, TeacherSpec],
                device: Optional[torch.device] = None) -> InheritedModel:
    """The student with a pair of heads and normalisers per teacher, sized by ``specs``; moved to
    ``device`` with ``move_to`` (a quantized base's bitsandbytes state moves too), else left where built."""
    model = InheritedModel(student, specs, recipe.space.head_hidden, recipe.space.normalizer)
    return model if device is None else move_to(model, device)


class TrainingImages(NamedTuple):
    source: ImageSource
    augmented: TrainImages  # random resized crops and flips, seeded per epoch
    calibration: TrainImages  # centre crops: the calibration pass and the fidelity batch


def training_images(recipe: Recipe) -> TrainingImages:
    d, seed = recipe.data, recipe.train.seed
    source, _ = recipe_sources(d)
    augmented = TrainImages(source, TrainTransform(d.image_size, scale=(d.crop_scale_min, 1.0), hflip=d.hflip), seed=seed)
    return TrainingImages(source, augmented, TrainImages(source, EvalTransform(d.image_size), seed=seed))
