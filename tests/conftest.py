"""Test set-up: Triton's interpreter without CUDA, fresh seeds per test, the gpu marker."""
import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any module defining @triton.jit kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed every RNG from the test's name: reproducible, yet different across tests."""
    seed = abs(hash(request.node.nodeid)) % (2**31)
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
