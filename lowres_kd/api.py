"""``lowres_kd.load``: a finished run (or any checkpoint) back as a module, without teachers."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import recipe_from_dict
from .model import InheritedModel
from .teachers import TeacherSpec
from .training import checkpoint as ckpt


def _checkpoint_dir(path: Path) -> Path:
    if (path / ckpt.COMPLETE).is_file():
        return path
    if (path / "model" / ckpt.COMPLETE).is_file():
        return path / "model"
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint nor a run directory with model/ or checkpoints/")
    return latest


def load(run_or_checkpoint: str | Path, device: str | torch.device = "cpu") -> InheritedModel:
    """Rebuild the inherited model of a run directory or checkpoint, in eval mode.

    ``model(images)`` takes RGB images in [0, 1], (N, 3, H, W), and returns the student's
    global and dense features and, per teacher, the adapted features in that teacher's raw
    space. Only the student's architecture is built; no teacher weights are read.
    """
    from .training.trainer import build_student_and_teachers

    path = _checkpoint_dir(Path(run_or_checkpoint))
    tensors, meta = ckpt.read_dir(path, ["model"])
    recipe = recipe_from_dict(meta["recipe"], source=str(path), check_values=False)
    specs = {n: TeacherSpec(**{**s, "grid": tuple(s["grid"]), "mean": tuple(s["mean"]), "std": tuple(s["std"])})
             for n, s in meta["specs"].items()}
    student, _ = build_student_and_teachers(recipe, load_weights=False)
    model = InheritedModel(student, specs, recipe.space.head_hidden, recipe.space.normalizer)
    model.load_state_dict(tensors["model"])
    model.requires_grad_(False)
    return model.to(device).eval()
