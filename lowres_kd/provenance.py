"""Where a measurement came from: the git revision, for benchmark rows and result files."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


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
