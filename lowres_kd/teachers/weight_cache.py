"""Converted weights kept on disk, so that a conversion (ONNX initializers -> timm names) runs once.

``converted(source, convert, kind)`` returns a safetensors file holding ``convert(source)``. The
file lives in ``$LOWRES_KD_CACHE`` (default ``~/.cache/lowres_kd``), named by the conversion kind
and a key of the source's resolved path, size and modification time: a changed or replaced source
file gets a fresh conversion, an unchanged one is read back through safetensors. Files are
written to a temporary name in the same folder and renamed, so a crash mid-write leaves no
half-written cache entry and two processes converting at once both end with a whole file.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict

import torch
from safetensors.torch import save_file

CACHE_ENV = "LOWRES_KD_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lowres_kd")


def converted(source: str | os.PathLike, convert: Callable[[Path], Dict[str, torch.Tensor]], kind: str) -> Path:
    """The cached safetensors file of ``convert(source)``, converting on the first call."""
    source = Path(source).resolve()
    stat = source.stat()
    key = hashlib.sha256(f"{kind}|{source}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    path = cache_dir() / f"{kind}-{source.stem}-{key}.safetensors"
    if path.is_file():
        return path
    state = {k: v.contiguous() for k, v in convert(source).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"source": str(source), "size": str(stat.st_size),
                                        "mtime_ns": str(stat.st_mtime_ns), "kind": kind})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
