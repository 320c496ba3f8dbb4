"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_XXXXXXX`` holding ``model.safetensors``,
``optimizer.safetensors``, ``rng.safetensors`` and ``state.json``; the final model is exported
to ``<run>/model``. Each is written into a temporary sibling directory that is renamed into
place only when complete, so a crash mid-write leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{7})$")
COMPLETE = "state.json"  # written last: its presence marks an intact checkpoint


def _contiguous(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous, and one storage per name: safetensors refuses shared memory (bitsandbytes
    shares one quantization map among all its parameters' states)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk: a rename must not outlive its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensors(file: Path, tensors: Dict[str, torch.Tensor]) -> None:
    save_file(_contiguous(tensors), str(file))
    _fsync(file)


def read_tensors(file: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as exc:  # a pickle or anything else posing as safetensors
        raise ValueError(f"{file} is not a valid safetensors file; refusing to load it ({exc})") from exc


def staging_dir(target: Path) -> Path:
    """The fixed temporary sibling that every rank of a run writes its part of ``target`` into."""
    return Path(target).with_name(f".{Path(target).name}.partial")


def write_dir(target: Path, tensors: Dict[str, Dict[str, torch.Tensor]], meta: dict,
              staging: Optional[Path] = None) -> Path:
    """Write ``{file: tensors}`` as safetensors plus ``state.json`` into ``target`` atomically.

    ``staging``: a temporary directory that already holds other files of the checkpoint (the
    engine's state, written by every rank); by default a fresh one is made.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(staging) if staging is not None else Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if staging is not None:  # what the engine wrote there must be on disk before state.json says "complete"
            for file in sorted(tmp.rglob("*")):
                _fsync(file)
        for name, group in tensors.items():
            write_tensors(tmp / f"{name}.safetensors", group)
        (tmp / COMPLETE).write_text(json.dumps(meta, indent=1))
        _fsync(tmp / COMPLETE)
        _fsync(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_dir(path: Path, names: List[str]) -> Tuple[Dict[str, Dict[str, torch.Tensor]], dict]:
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE})")
    meta = json.loads((path / COMPLETE).read_text())
    tensors = {}
    for name in names:
        file = path / f"{name}.safetensors"
        if not file.is_file():
            continue
        tensors[name] = read_tensors(file)
    return tensors, meta


def step_checkpoints(run_dir: Path) -> List[Path]:
    """Intact step checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = step_checkpoints(run_dir)
    return found[-1] if found else None


def rotate(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` (>= 1) step checkpoints."""
    for old in step_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def optimizer_to_tensors(state: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into flat tensors and JSON-able groups. Nested slot
    dicts (bitsandbytes keeps its quantization state in one) flatten to ``idx.key/sub`` names."""
    tensors, scalars = {}, {}

    def put(name: str, value) -> None:
        if isinstance(value, dict):
            for sub, v in value.items():
                put(f"{name}/{sub}", v)
        elif torch.is_tensor(value):
            tensors[name] = value
        else:
            scalars[name] = value

    for idx, slots in state["state"].items():
        for key, value in slots.items():
            put(f"{idx}.{key}", value)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state: Dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, path = flat.split(".", 1)
        node = state.setdefault(int(idx), {})
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {"state": state, "param_groups": meta["param_groups"]}
