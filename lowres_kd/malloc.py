"""The command line's allocator setting: glibc told to keep freed memory for reuse.

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
gives it back to the kernel on free; a CPU training step frees and reallocates such blocks (a
batch of feature maps) hundreds of times, and every page comes back through a page fault. On the
CPU demo that was a third of the run's time in the kernel; kept for reuse, a cached step took
0.97 s instead of 2.37 s and a live one 2.46 s instead of 5.08 s. glibc
reads these settings at start-up only, so ``lowres-kd`` re-runs itself once with them set.
The cost: freed memory stays in the process, so its resident set stays near its peak.

Torch-free: the command line calls this before anything heavy is imported.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
OPT_OUT = "LOWRES_KD_SYSTEM_MALLOC"  # set to 1: keep glibc's defaults


def keep_freed_env(environ: Mapping[str, str]) -> Optional[dict]:
    """``environ`` with ``KEEP_FREED`` added, or None where there is nothing to change: not
    glibc, opted out, or either setting already chosen by the user (theirs wins)."""
    if environ.get(OPT_OUT, "") not in ("", "0") or any(k in environ for k in KEEP_FREED):
        return None
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    return {**environ, **KEEP_FREED}


def reexec_keeping_freed_memory() -> None:
    """Replace this process with the same command under ``keep_freed_env`` (same PID, so a
    launcher that waits on it is not disturbed); returns where nothing needs to change."""
    env = keep_freed_env(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
