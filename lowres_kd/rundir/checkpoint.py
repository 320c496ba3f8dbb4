"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_XXXXXXX`` holding ``model.safetensors``,
``optimizer.safetensors``, ``rng.safetensors`` and ``state.json``; the final model is exported
to ``<run>/model``. Each is written into a temporary sibling directory that is renamed into
place only when complete, so a crash mid-write leaves the previous checkpoint as it was.

``state.json`` records the sha256 of every other file of the checkpoint (``"sha256"``); reading
a file checks it, so a flipped byte or a truncated file is refused by name
(:class:`BadCheckpoint`) instead of loading silently. Checkpoints written before the hashes
existed load without the check.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

STEP_DIR = re.compile(r"^step_(\d{7})$")
COMPLETE = "state.json"  # written last: its presence marks an intact checkpoint
HASHES = "sha256"  # state.json's record of every other file: {relative path: hex digest}


class BadCheckpoint(UserError, ValueError):
    """A checkpoint whose files cannot be trusted: damaged, truncated, or not what state.json says."""


class NoCheckpoint(UserError, FileNotFoundError):
    """A path that is neither a checkpoint nor a run directory holding one."""


def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry to disk: a rename must not outlive its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensors(file: Path, tensors: Dict[str, torch.Tensor]) -> None:
    save_file(_contiguous(tensors), str(file))
    fsync_path(file)


def read_tensors(file: Path, sha256: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file; with ``sha256``, only if the file still has that hash."""
    if sha256 is not None:
        check_hash(file, sha256)
    try:
        return load_file(str(file))
    except Exception as exc:  # a pickle or anything else posing as safetensors
        raise BadCheckpoint(f"{file} is not a valid safetensors file; refusing to load it ({exc})") from exc


def check_hash(file: Path, sha256: str) -> None:
    try:
        got = sha256_file(file)
    except OSError as exc:
        raise BadCheckpoint(f"{file} cannot be read ({exc})") from exc
    if got != sha256:
        raise BadCheckpoint(f"{file} is damaged: its sha256 is {got[:12]}..., state.json recorded {sha256[:12]}... "
                            f"(a flipped byte, a truncated copy or an edit); refusing to load it")


def verify(path: Path, meta: dict) -> None:
    """Every file ``state.json`` recorded, present and unchanged (nothing to check in older
    checkpoints, which recorded no hashes)."""
    for rel, digest in sorted(meta.get(HASHES, {}).items()):
        file = Path(path) / rel
        if not file.is_file():
            raise BadCheckpoint(f"{file} is missing (state.json lists it)")
        check_hash(file, digest)


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
                fsync_path(file)
        for name, group in tensors.items():
            write_tensors(tmp / f"{name}.safetensors", group)
        hashes = {f.relative_to(tmp).as_posix(): sha256_file(f) for f in sorted(tmp.rglob("*"))
                  if f.is_file() and f.name != COMPLETE}
        (tmp / COMPLETE).write_text(json.dumps({**meta, HASHES: hashes}, indent=1))
        fsync_path(tmp / COMPLETE)
        fsync_path(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_meta(path: Path) -> dict:
    """A checkpoint's ``state.json``; :class:`BadCheckpoint` when it is empty, not JSON or not a mapping."""
    file = Path(path) / COMPLETE
    if not file.is_file():
        raise BadCheckpoint(f"{path} is not a complete checkpoint (no {COMPLETE})")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadCheckpoint(f"{file} cannot be read as JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get(HASHES, {}), dict):
        raise BadCheckpoint(f"{file} is not a checkpoint's state (expected a JSON mapping)")
    return meta


def read_dir(path: Path, names: List[str], required: Tuple[str, ...] = ()
             ) -> Tuple[Dict[str, Dict[str, torch.Tensor]], dict]:
    """``({name: tensors}, state)`` of the ``names`` files present (``required`` ones must be);
    each file checked against its recorded sha256."""
    path = Path(path)
    meta = read_meta(path)
    hashes = meta.get(HASHES, {})
    tensors = {}
    for name in names:
        file = path / f"{name}.safetensors"
        if not file.is_file():
            if name in required or f"{name}.safetensors" in hashes:
                raise BadCheckpoint(f"{file} is missing")
            continue
        tensors[name] = read_tensors(file, hashes.get(f"{name}.safetensors"))
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


def checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory itself, or a run's ``model/``, else its newest step checkpoint."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    if (path / "model" / COMPLETE).is_file():
        return path / "model"
    latest = latest_checkpoint(path)
    if latest is None:
        raise NoCheckpoint(f"{path}: neither a checkpoint nor a run directory with model/ or checkpoints/; "
                           f"give the run's folder (the train recipe's output_dir)")
    return latest


def candidates(path: Path) -> List[Path]:
    """Where to read a run from, best first: a checkpoint given itself; else the run's ``model/``
    then its step checkpoints, newest first (``lowres_kd.load`` falls back along this list)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return [path]
    found = [path / "model"] if (path / "model" / COMPLETE).is_file() else []
    found += list(reversed(step_checkpoints(path)))
    if not found:
        checkpoint_dir(path)  # raises NoCheckpoint with the message
    return found


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
