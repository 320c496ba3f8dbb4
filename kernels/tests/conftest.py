"""Kernel tests: Triton's interpreter without CUDA, fresh seeds per test, the gpu marker."""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the module defining the @triton.jit kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch from the test's name (and LOWRES_KD_TEST_SEED to draw other inputs)."""
    base = int(os.environ.get("LOWRES_KD_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + base) % (2**31))


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
