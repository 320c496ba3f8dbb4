"""Helpers the tests share: a tiny real recipe, a run's log, training to the end, a benchmark
script as a module. (Not in conftest.py: the kernel package's tests have a conftest of their own,
and ``from helpers import`` would find either.)"""
import csv
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from lowres_kd.config import recipe_from_dict
from lowres_kd.launch import trainer_for


def tiny_recipe_dict(run_dir, **sections) -> dict:
    """A real but small recipe: shipped MobileNetV2 base, EfficientNet-Lite0 and HED at 64 px.

    Its images are the 23 shipped photos alone: Fashion-MNIST is optional (a Debian package), and
    a test's training set must not depend on whether the machine has it."""
    recipe = {
        "name": "tiny",
        "output_dir": str(run_dir),
        "teachers": [
            {"name": "mobilenet", "family": "mobilenet_v2", "input_size": 64, "base": True},
            {"name": "effnet", "family": "efficientnet_lite0", "input_size": 64},
            {"name": "edges", "family": "hed", "input_size": 64},
        ],
        "space": {"calibration_images": 16, "head_hidden": 128},
        "data": {"image_size": 64, "fashion_mnist": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1},
        "probe": {"train_per_class": 3, "test_per_class": 3, "edge_images": 6, "fidelity_images": 4, "image_size": 64,
                  "segmentation_train": 4, "segmentation_test": 4, "segmentation_steps": 20},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_photo_folder(folder, n_good=9, upright=False):
    """Real photos, small, in every colour layout the decoder converts (RGBA, 16-bit grey, palette;
    ``upright``: one with an EXIF rotation too), and three unreadable files; their names."""
    folder.mkdir()
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.camera(), skdata.rocket()]
    for i in range(n_good):
        Image.fromarray(photos[i % len(photos)]).resize((80, 64)).save(folder / f"good_{i}.{'png' if i % 2 else 'jpg'}")
    Image.fromarray(skdata.chelsea()).convert("RGBA").resize((70, 70)).save(folder / "rgba.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(folder / "sixteen_bit.png")
    Image.fromarray(skdata.coffee()).resize((64, 64)).convert("P").save(folder / "palette.png")
    if upright:
        exif = Image.Exif()
        exif[0x0112] = 6  # taken rotated: decoded upright, 64 wide and 80 high
        Image.fromarray(skdata.rocket()).resize((80, 64)).save(folder / "upright.jpg", exif=exif)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    good = (folder / "good_0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return {"empty.jpg", "notes.png", "truncated.jpg"}


def read_log(run_dir):
    """The rows of a run's log.csv, one per logged step."""
    with (run_dir / "log.csv").open() as f:
        return list(csv.DictReader(f))


def logged_losses(run_dir):
    """The loss of every logged step of a run."""
    return [float(r["loss"]) for r in read_log(run_dir)]


def train_to_end(recipe):
    """Set up and train a recipe to its last step; the trainer (its run lies in recipe.run_dir)."""
    trainer = trainer_for(recipe, progress=False).setup()
    trainer.train()
    return trainer


def load_benchmark(name: str):
    """Import benchmarks/<name>.py (a script, not a package module) for its main()."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_recipe_from(run_dir, **sections):
    return recipe_from_dict(tiny_recipe_dict(run_dir, **sections))
