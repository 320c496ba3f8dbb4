"""Inputs for running the GPU recipes offline, shared by bench_train.py and check_planner.py:
random-weight local files in place of their hub checkpoints (speed and memory do not depend on
the weights; fidelity does, so the benchmarks switch the fidelity floors off), and a folder of
random images where the embedded photographs are too few for a batch (the loader drops the last
incomplete batch: 25 photos and a batch of 64 would give no batch at all).

    python benchmarks/recipe_inputs.py recipes/vitb_dinov2_clip_sam_12gb.yaml --weights /tmp/w --images /tmp/img
prints the overrides that point the recipe at them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _random_file(model: str, input_size: int, folder: Path) -> Path:
    """A timm model of that name with random weights (seed 0), saved once as safetensors."""
    path = folder / f"{model.replace('/', '_')}-{input_size}.safetensors"
    if path.is_file():
        return path
    import timm
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    try:
        net = timm.create_model(model, pretrained=False, num_classes=0, img_size=input_size)
    except TypeError:  # models without img_size (CNNs)
        net = timm.create_model(model, pretrained=False, num_classes=0)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(path)  # a file killed half-way is never taken for a whole one
    return path


def random_weight_overrides(recipe, folder: Path) -> List[str]:
    """Overrides that replace every ``weights: hub`` of ``recipe`` (teachers and student) by a
    random-weight local file in ``folder`` (written on first use, reused after), and switch the
    teachers' fidelity floors off (random weights are not what a fidelity check is about)."""
    out = []
    for i, t in enumerate(recipe.teachers):
        if t.weights == "hub":
            out.append(f"teachers.{i}.weights={_random_file(t.model, t.input_size, folder)}")
        out.append(f"teachers.{i}.min_fidelity=0.0")
    s = recipe.student
    if s.weights == "hub":
        out.append(f"student.weights={_random_file(s.model, s.input_size, folder)}")
    return out


def random_image_folder(folder: Path, n: int, size: int = 256) -> Path:
    """``n`` random RGB PNGs (seeded) in ``folder``; kept when already there."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.png")))
    rng = np.random.default_rng(0)
    for k in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if k >= have:
            Image.fromarray(arr).save(folder / f"random_{k:04d}.png")
    return folder


def image_overrides(recipe, folder: Path, steps: int) -> List[str]:
    """``data.source`` pointing at enough random images for ``steps`` optimizer steps (at least
    two full micro-batches), and no worker processes (short runs: their start-up dominates)."""
    micro = recipe.train.batch_size
    n = max(2 * micro, min(512, micro * recipe.train.grad_accum * steps))
    random_image_folder(folder, n, size=max(64, recipe.data.image_size))
    return [f"data.source={folder}", "data.num_workers=0"]


def main(argv: Optional[List[str]] = None) -> int:
    from lowres_kd.config import load_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--weights", type=Path, required=True, help="folder for the random-weight files")
    ap.add_argument("--images", type=Path, default=None, help="folder for random images (default: none)")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    recipe = load_recipe(args.recipe)
    out = random_weight_overrides(recipe, args.weights)
    if args.images:
        out += image_overrides(recipe, args.images, args.steps)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
