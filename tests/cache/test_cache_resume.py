"""A cache build killed with SIGKILL part-way continues on rerun to the bytes of an uninterrupted one.

Every build is a fresh ``lowres-kd cache`` process, as a user runs it, on one thread: the claim
is about what the resume keeps and recomputes, and a multi-threaded BLAS may round differently
from run to run (MKL with dynamic threading), which would make the check flaky, not stricter."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import tiny_recipe_dict
from lowres_kd.cache import MANIFEST
from lowres_kd.cache.build import PROGRESS

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'kernels'}",
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}


def files(root: Path) -> dict:
    """Each file's sha256 by its path in the cache (a failure names the files that differ)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def shards_done(cache: Path) -> int:
    """View-shards the build has recorded as finished (the ones a rerun keeps)."""
    try:
        return len(json.loads((cache / PROGRESS).read_text())["done"])
    except (OSError, ValueError, KeyError):
        return 0


def cache_command(tmp_path: Path, name: str) -> list:
    recipe = tiny_recipe_dict(tmp_path / f"run_{name}", cache={"epochs": 2, "shard_images": 4,
                                                               "dir": str(tmp_path / f"cache_{name}")})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return [sys.executable, "-m", "lowres_kd.cli", "cache", str(path), "--no-progress"]


@pytest.mark.slow  # three tiny builds in subprocesses that import torch: about 60 s on 2 cores
def test_sigkill_during_build_then_rerun_is_byte_identical(tmp_path):
    subprocess.run(cache_command(tmp_path, "straight"), env=ENV, check=True)

    killed = cache_command(tmp_path, "killed")
    proc = subprocess.Popen(killed, env=ENV)
    cache = tmp_path / "cache_killed"
    deadline = time.time() + 120
    while not shards_done(cache) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cache / MANIFEST).exists()  # killed before the end: not a cache yet
    assert shards_done(cache) >= 1  # what the rerun must keep, written by another process
    rerun = subprocess.run(killed, env=ENV, check=True, capture_output=True, text=True)
    assert "continuing an interrupted build" in rerun.stdout + rerun.stderr
    assert files(cache) == files(tmp_path / "cache_straight")
