"""Test set-up: Triton's interpreter without CUDA, fresh seeds per test, the gpu marker; helpers
to build a tiny recipe, read a run's log and import a benchmark script."""
import csv
import os
import random
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any module defining @triton.jit kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed every RNG from the test's name (and LOWRES_KD_TEST_SEED to draw other inputs)."""
    base = int(os.environ.get("LOWRES_KD_TEST_SEED", "0"))
    seed = (zlib.crc32(request.node.nodeid.encode()) + base) % (2**31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_recipe_dict(run_dir, **sections) -> dict:
    """A real but small recipe: shipped MobileNetV2 base, EfficientNet-Lite0 and HED at 64 px."""
    recipe = {
        "name": "tiny",
        "output_dir": str(run_dir),
        "teachers": [
            {"name": "mobilenet", "family": "mobilenet_v2", "input_size": 64, "base": True},
            {"name": "effnet", "family": "efficientnet_lite0", "input_size": 64},
            {"name": "edges", "family": "hed", "input_size": 64},
        ],
        "space": {"calibration_images": 16, "head_hidden": 128},
        "data": {"image_size": 64, "fashion_mnist": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1},
        "probe": {"train_per_class": 3, "test_per_class": 3, "edge_images": 6, "fidelity_images": 4, "image_size": 64},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


@pytest.fixture
def tiny_recipe(tmp_path):
    from lowres_kd.config import recipe_from_dict

    def make(**sections):
        return recipe_from_dict(tiny_recipe_dict(tmp_path / "run", **sections))

    return make


def read_log(run_dir):
    """The rows of a run's log.csv, one per logged step."""
    with (run_dir / "log.csv").open() as f:
        return list(csv.DictReader(f))


def logged_losses(run_dir):
    """The loss of every logged step of a run."""
    return [float(r["loss"]) for r in read_log(run_dir)]


def train_to_end(recipe):
    """Set up and train a recipe to its last step; the trainer (its run lies in recipe.run_dir)."""
    from lowres_kd.training.trainer import Trainer

    trainer = Trainer(recipe, progress=False).setup()
    trainer.train()
    return trainer


def load_benchmark(name: str):
    """Import benchmarks/<name>.py (a script, not a package module) for its main()."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
