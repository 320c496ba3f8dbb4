"""Where a measurement came from (the git revision, versions, device), for benchmark rows and
result files, and the three files every benchmark writes."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Callable


def git_sha(repo: Path) -> str:
    """Short sha (``-dirty`` with uncommitted tracked changes); ``LOWRES_KD_GIT_SHA`` overrides,
    for copies of the checkout without ``.git`` (the lent GPU machine)."""
    if os.environ.get("LOWRES_KD_GIT_SHA"):
        return os.environ["LOWRES_KD_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:
        return None


def environment(device, repo: Path, modules=("triton", "bitsandbytes", "timm", "deepspeed")) -> dict:
    """Device, its name, library versions and the git sha: the header of every benchmark result."""
    import torch  # here, not at the top: the GPU summary reads results without loading torch

    names = {"cuda": lambda: torch.cuda.get_device_name(device), "meta": lambda: "meta device, allocations counted"}
    name = names.get(device.type, lambda: platform.processor() or platform.machine() or "cpu")()
    env = {"device": device.type, "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "threads": torch.get_num_threads(), "git_sha": git_sha(repo)}
    env.update({m: _version(m) for m in modules})
    return env


def device_slug(env: dict) -> str:
    """The GPU's name as a file-name part (``nvidia-h200``); ``cpu`` or ``meta`` for those devices."""
    if env["device"] != "cuda":
        return env["device"]
    return re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-") or "cuda"


def write_results(folder: Path, name: str, env: dict, result: dict, markdown: Callable[[Path], None],
                  plot: Callable[[Path], None]) -> Path:
    """``<folder>/<name>_<device>.json`` holding ``result`` (values JSON has no type for, such as
    paths, written as strings), and the ``.md`` table and ``.png`` plot that ``markdown(path)`` and
    ``plot(path)`` write. Returns the path without its suffix."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{name}_{device_slug(env)}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    markdown(stem.with_suffix(".md"))
    plot(stem.with_suffix(".png"))
    print(f"wrote {stem}.json/.md/.png")
    return stem
