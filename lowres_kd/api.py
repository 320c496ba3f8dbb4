"""``lowres_kd.load``: a finished run (or any checkpoint) back as a module, without teachers."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .build import build_model, build_student
from .config import recipe_from_dict
from .lowmem import move_to
from .model import InheritedModel
from .rundir import checkpoint as ckpt
from .teachers import TeacherSpec


def load(run_or_checkpoint: str | Path, device: str | torch.device = "cpu") -> InheritedModel:
    """Rebuild the inherited model of a run directory or checkpoint, in eval mode.

    ``model(images)`` takes RGB images in [0, 1], (N, 3, H, W), and returns the student's
    global and dense features and, per teacher, the adapted features in that teacher's raw
    space. Only the student's architecture is built; no teacher weights are read.

    A run directory is read from ``model/``, else its newest step checkpoint; one that cannot be
    read (damaged, truncated, a garbled ``state.json``) is named on stderr and the next older one
    is tried, as ``--resume`` does. A checkpoint directory given itself is read or refused.
    """
    found = ckpt.candidates(Path(run_or_checkpoint))
    failures = []
    for path in found:
        try:
            model = _load_checkpoint(path)
        except ckpt.BadCheckpoint as exc:
            failures.append(str(exc))
            print(f"lowres-kd: skipping unreadable checkpoint {path}: {exc}", file=sys.stderr)
            continue
        if failures:
            print(f"lowres-kd: loaded {path} instead (the newest readable checkpoint)", file=sys.stderr)
        return move_to(model, device).eval()
    if len(found) == 1:
        raise ckpt.BadCheckpoint(failures[0])
    raise ckpt.BadCheckpoint(f"{run_or_checkpoint}: no readable checkpoint among {len(found)} "
                             f"({'; '.join(failures)})")


def _load_checkpoint(path: Path) -> InheritedModel:
    tensors, meta = ckpt.read_dir(path, ["model"], required=("model",))
    try:
        recipe = recipe_from_dict(meta["recipe"], source=f"{path}/state.json", check_values=False)
        specs = {n: TeacherSpec.from_dict(s) for n, s in meta["specs"].items()}
        model = build_model(recipe, build_student(recipe, load_weights=False), specs)
        model.load_state_dict(tensors["model"])
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError, AssertionError) as exc:
        # a state.json or tensors not of a run (bitsandbytes asserts on a garbled nf4 state)
        raise ckpt.BadCheckpoint(f"{path} does not hold a run's model ({type(exc).__name__}: {exc})") from exc
    model.requires_grad_(False)
    return model
