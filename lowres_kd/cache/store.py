"""Teacher feature cache (DESIGN §3): run each teacher once, train with no teacher loaded.

``lowres-kd cache RECIPE`` fits the normalisers, then stores every teacher's *normalised*
targets (global (C) and dense (C, h, w)) for ``cache.epochs`` augmented views of every image, in
shards of ``cache.shard_images`` images: ``<teacher>/e<epoch>_s<shard>.safetensors``, fp16, or
int8 with one scale per row (per image for global, per token for dense); with ``cache.rank`` the
rows are PCA coefficients (``rank``). A recipe with
``teachers_from: cache`` then trains from it: epoch e reuses the crops and targets of view
e mod ``cache.epochs``.

``manifest.json`` records what the targets depend on: each teacher's entry and a fingerprint of
its weight file, its spec, the normaliser, the image list, the augmentation (seed, size, crop,
flip) and the storage dtype. Training refuses a cache whose manifest differs from the recipe and
says what differs; shard paths must stay inside the cache folder.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..dict_diff import dict_differences
from ..errors import UserError
from ..rundir.checkpoint import fsync_path, sha256_file, write_tensors
from ..schema import Recipe
from ..teachers import Features, TeacherSpec
from .rank import BASIS, basis_of, reconstruct

MANIFEST = "manifest.json"
NORMALIZERS = "normalizers.safetensors"
FORMAT_VERSION = 2  # 2: shards may hold PCA coefficients (cache.rank)


class StaleCacheError(UserError, ValueError):
    pass


# ----------------------------------------------------------------------------- storage dtype
def encode(x: torch.Tensor, dtype: str) -> Dict[str, torch.Tensor]:
    """Rows of x (..., C) as fp16, or int8 with a per-row fp32 scale (max |x| / 127)."""
    if dtype == "fp16":
        return {"q": x.to(torch.float16)}
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
    return {"q": torch.round(x / scale).clamp(-127, 127).to(torch.int8), "scale": scale.float()}


def decode(parts: Dict[str, torch.Tensor]) -> torch.Tensor:
    if "scale" in parts:
        return parts["q"].float() * parts["scale"]
    return parts["q"].float()


# ----------------------------------------------------------------------------- manifest
def _fingerprint(weights: str) -> str:
    """What identifies a weight file without reading it all: path, size and modification time.
    Shipped weights are identified by the pinned package that holds them."""
    if weights in ("shipped", "hub", "none") or not Path(weights).is_file():
        return weights
    st = Path(weights).stat()
    return f"{Path(weights).resolve()}:{st.st_size}:{int(st.st_mtime)}"


def expected_manifest(recipe: Recipe, image_names: List[str], specs: Dict[str, dict]) -> dict:
    """The fields a cache must match to serve ``recipe`` (everything but the file list)."""
    d = recipe.data
    teachers = {}
    for t in recipe.cached_teachers:  # live teachers (cache: false) are not in the cache
        teachers[t.name] = {"family": t.family, "model": t.model, "weights": t.weights, "input_size": t.input_size,
                            "layer": t.layer, "bits": t.bits, "fingerprint": _fingerprint(t.weights),
                            "spec": specs[t.name]}
    return {
        "format": FORMAT_VERSION,
        "teachers": teachers,
        "normalizer": recipe.space.normalizer,
        "calibration_images": recipe.space.calibration_images,
        "images": {"source": d.source, "count": len(image_names),
                   "sha1": hashlib.sha1("\n".join(image_names).encode()).hexdigest()},
        "augmentation": {"seed": recipe.train.seed, "image_size": d.image_size, "crop_scale_min": d.crop_scale_min,
                         "hflip": d.hflip, "epochs": recipe.cache.epochs},
        "dtype": recipe.cache.dtype,
        "rank": recipe.cache.rank,
        "rank_images": recipe.cache.rank_images if recipe.cache.rank else None,
        "shard_images": recipe.cache.shard_images,
    }


def cache_manifest(recipe: Recipe, image_names: List[str], specs: Dict[str, TeacherSpec]) -> dict:
    """``expected_manifest`` of a built model's teacher specs."""
    return expected_manifest(recipe, image_names, {n: s.to_dict() for n, s in specs.items()})


def _inside(root: Path, relative: str) -> Path:
    path = (root / relative).resolve()
    if os.path.commonpath([path, root.resolve()]) != str(root.resolve()):
        raise StaleCacheError(f"{root / MANIFEST}: file {relative!r} points outside the cache folder; refusing it")
    return path


# ----------------------------------------------------------------------------- writing
def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _replace(tmp: Path, path: Path) -> None:
    """Rename a written and flushed ``tmp`` over ``path``, and flush the rename: a file under its
    final name is always complete, also after a crash or a power cut."""
    os.replace(tmp, path)
    fsync_path(path.parent)


def save_atomic(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    write_tensors(tmp, tensors)
    _replace(tmp, path)


def save_json_atomic(value, path: Path) -> None:
    tmp = _temporary(path)
    tmp.write_text(json.dumps(value, indent=1))
    fsync_path(tmp)
    _replace(tmp, path)


def remove_temporaries(root: Path) -> None:
    """The temporary files a killed build left behind (never read: no manifest lists them)."""
    for tmp in root.rglob(".*.tmp"):
        tmp.unlink()


def normalizer_tensors(model, names: List[str]) -> Dict[str, torch.Tensor]:
    """The fitted normalisers of teachers ``names``, flat, as ``normalizers.safetensors`` keeps them."""
    return {f"{kind}.{name}.{k}": v for kind, mods in (("global", model.norm_global), ("dense", model.norm_dense))
            for name in names for k, v in mods[name].state_dict().items()}


def load_normalizers(model, state: Dict[str, torch.Tensor], names: List[str]) -> None:
    """Put the normalisers of teachers ``names`` from a flat ``normalizer_tensors`` dict into ``model``."""
    for kind, mods in (("global", model.norm_global), ("dense", model.norm_dense)):
        for name in names:
            prefix = f"{kind}.{name}."
            mods[name].load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


# ----------------------------------------------------------------------------- reading
class TargetCache:
    """Normalised teacher targets read back from a cache that matches ``expected``."""

    def __init__(self, root: Path, expected: Optional[dict] = None):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no complete teacher cache at {self.root} (no {MANIFEST}); "
                                    f"build it with: lowres-kd cache RECIPE")
        self.manifest = json.loads(path.read_text())
        # the teachers it serves: the recipe's cached ones (a teacher the cache holds beyond them is not read)
        self.names = list((expected or self.manifest)["teachers"])
        if expected is not None:
            found = {k: self.manifest.get(k) for k in expected}
            held = self.manifest.get("teachers") or {}
            found["teachers"] = {n: held[n] for n in self.names if n in held}
            diffs = dict_differences(found, expected)
            if diffs:
                raise StaleCacheError(f"the teacher cache at {self.root} does not match the recipe; rebuild it with "
                                      f"`lowres-kd cache RECIPE` (differences: " + "; ".join(diffs) + ")")
        self.files = {rel: _inside(self.root, rel) for rel in self.manifest["files"]}
        self.epochs = self.manifest["augmentation"]["epochs"]
        self.shard = self.manifest["shard_images"]
        self._open: Dict[str, object] = {}  # shard path -> safe_open handle: rows are read one by one
        self.bases: Dict[str, torch.Tensor] = {}
        if self.manifest.get("rank"):  # shards hold coefficients: the basis turns them back into targets
            path = _inside(self.root, BASIS)
            if not path.is_file() or sha256_file(path) != self.manifest.get("basis_sha256"):
                raise StaleCacheError(f"{path}: missing or not the basis this cache was built with "
                                      f"(sha256 differs from {MANIFEST}); rebuild it with `lowres-kd cache RECIPE`")
            self.bases = load_file(str(path))

    def specs(self) -> Dict[str, dict]:
        return {name: t["spec"] for name, t in self.manifest["teachers"].items()}

    def load_normalizers(self, model) -> None:
        """Put the normalisers fitted when the cache was built into ``model`` (the teachers it serves)."""
        load_normalizers(model, load_file(str(_inside(self.root, NORMALIZERS))), self.names)

    def _shard(self, name: str, epoch: int, shard: int):
        rel = f"{name}/e{epoch:03d}_s{shard:05d}.safetensors"
        if rel not in self.files:
            raise StaleCacheError(f"{self.root}: the manifest lists no shard {rel}")
        if rel not in self._open:  # memory-mapped: opening is cheap, a row read touches one row
            self._open[rel] = safe_open(str(self.files[rel]), framework="pt")
        return self._open[rel]

    @functools.cached_property
    def identity(self) -> dict:
        """What a checkpoint records of the cache it trained from: the sha256 of its normalisers
        and basis (a rebuilt cache gives other targets, even with the same manifest)."""
        return {"normalizers": sha256_file(_inside(self.root, NORMALIZERS)),
                "basis": self.manifest.get("basis_sha256")}

    def _stored(self, rows: torch.Tensor, kind: str, name: str, device: torch.device) -> torch.Tensor:
        rows = rows.to(device)
        if self.bases and self.bases[next(iter(self.bases))].device != device:  # once, not every batch
            self.bases = {k: v.to(device) for k, v in self.bases.items()}
        pair = basis_of(self.bases, kind, name)
        if pair is None:
            return rows
        return reconstruct(rows, *pair)

    @staticmethod
    def _row(shard, kind: str, r: int) -> torch.Tensor:
        parts = {key.split(".", 1)[1]: shard.get_slice(key)[r:r + 1][0] for key in shard.keys() if key.startswith(kind + ".")}
        return decode(parts)

    def targets(self, epoch: int, indices: torch.Tensor, device: torch.device) -> Dict[str, Features]:
        """Targets of images ``indices`` as cropped in training epoch ``epoch`` (view epoch mod E)."""
        view = epoch % self.epochs
        out = {}
        for name in self.names:
            g_rows, d_rows = [], []
            for i in indices.tolist():
                shard = self._shard(name, view, i // self.shard)
                r = i % self.shard
                if not bool(shard.get_slice("valid")[r:r + 1][0]):
                    raise StaleCacheError(f"{self.root}: image {i} was unreadable when the cache was built")
                g_rows.append(self._row(shard, "global", r))
                d_rows.append(self._row(shard, "dense", r))
            dense = self._stored(torch.stack(d_rows), "dense", name, device)
            out[name] = Features(self._stored(torch.stack(g_rows), "global", name, device), dense.permute(0, 3, 1, 2))
        return out
