"""Test set-up: Triton's interpreter without CUDA, fresh seeds per test, the gpu marker, the
tiny-recipe fixture (helpers.py holds what tests import)."""
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

from helpers import tiny_recipe_from  # noqa: E402  (after TRITON_INTERPRET is set)


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


@pytest.fixture
def tiny_recipe(tmp_path):
    def make(**sections):
        return tiny_recipe_from(tmp_path / "run", **sections)

    return make
