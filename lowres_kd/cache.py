"""Teacher feature cache (DESIGN §3): run each teacher once, train with no teacher loaded.

``lowres-kd cache RECIPE`` fits the normalisers, then stores every teacher's *normalised*
targets (global (C) and dense (C, h, w)) for ``cache.epochs`` augmented views of every image, in
shards of ``cache.shard_images`` images: ``<teacher>/e<epoch>_s<shard>.safetensors``, fp16, or
int8 with one scale per row (per image for global, per token for dense). A recipe with
``teachers_from: cache`` then trains from it: epoch e reuses the crops and targets of view
e mod ``cache.epochs``.

``manifest.json`` records what the targets depend on: each teacher's entry and a fingerprint of
its weight file, its spec, the normaliser, the image list, the augmentation (seed, size, crop,
flip) and the storage dtype. Training refuses a cache whose manifest differs from the recipe and
says what differs; shard paths must stay inside the cache folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .config import Recipe, dict_differences
from .teachers import Features
from .training.lock import RunLock

MANIFEST = "manifest.json"
NORMALIZERS = "normalizers.safetensors"
FORMAT_VERSION = 1


class StaleCacheError(ValueError):
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
    for t in recipe.teachers:
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
        "shard_images": recipe.cache.shard_images,
    }


def _inside(root: Path, relative: str) -> Path:
    path = (root / relative).resolve()
    if os.path.commonpath([path, root.resolve()]) != str(root.resolve()):
        raise StaleCacheError(f"{root / MANIFEST}: file {relative!r} points outside the cache folder; refusing it")
    return path


# ----------------------------------------------------------------------------- writing
def _save_atomic(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def build_cache(recipe: Recipe, progress: bool = True) -> dict:
    """Run the teachers over ``cache.epochs`` views of every image; returns the cache report."""
    from .training.trainer import Trainer

    with RunLock(recipe.run_dir):  # no trainer may read the cache of this run while it is rewritten
        return _build_cache(recipe, progress)


def _build_cache(recipe: Recipe, progress: bool) -> dict:
    from .training.trainer import Trainer

    trainer = Trainer(recipe, progress=progress).prepare_targets()
    root = recipe.cache_dir
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    names = [t.name for t in recipe.teachers]
    n, shard = len(trainer.dataset), recipe.cache.shard_images
    files: List[str] = []
    stored = raw = 0
    err_sum = ref_sum = 0.0
    err_max = 0.0
    model = trainer.model.eval()
    views = [(e, s) for e in range(recipe.cache.epochs) for s in range(0, n, shard)]
    for epoch, start in tqdm(views, desc="cache", disable=not progress):
        trainer.dataset.set_epoch(epoch)
        idx = list(range(start, min(n, start + shard)))
        rows: Dict[str, Dict[str, List[torch.Tensor]]] = {t: {"global": [], "dense": []} for t in names}
        valid = torch.zeros(len(idx), dtype=torch.bool)
        bs = recipe.train.batch_size
        for b in range(0, len(idx), bs):
            items = [trainer.dataset[i] for i in idx[b:b + bs]]
            ok = [j for j, it in enumerate(items) if torch.is_tensor(it)]
            if not ok:
                continue
            positions = [b + j for j in ok]
            valid[positions] = True
            images = torch.stack([items[j] for j in ok]).to(trainer.device)
            with torch.no_grad():
                for name, f in trainer.live_targets(images).items():
                    rows[name]["global"].append((positions, f.global_.cpu()))
                    rows[name]["dense"].append((positions, f.dense.permute(0, 2, 3, 1).cpu()))  # rows = tokens
        for name in names:
            tensors = {"valid": valid}
            for kind, chunks in rows[name].items():
                spec = trainer.model.specs[name]
                width = spec.global_dim if kind == "global" else spec.dense_dim
                shape = (len(idx), width) if kind == "global" else (len(idx), *spec.grid, width)
                full = torch.zeros(shape)
                for positions, values in chunks:
                    full[positions] = values.float()
                parts = encode(full, recipe.cache.dtype)
                back = decode(parts)
                err = (back - full)[valid]
                err_sum += float(err.pow(2).sum())
                ref_sum += float(full[valid].pow(2).sum())
                err_max = max(err_max, float(err.abs().max()) if err.numel() else 0.0)
                raw += full[valid].numel() * 4
                for key, value in parts.items():
                    tensors[f"{kind}.{key}"] = value
            rel = f"{name}/e{epoch:03d}_s{start // shard:05d}.safetensors"
            _save_atomic(tensors, root / rel)
            stored += (root / rel).stat().st_size
            files.append(rel)
    norm_state = {f"{kind}.{name}.{k}": v for kind, mods in (("global", model.norm_global), ("dense", model.norm_dense))
                  for name, mod in mods.items() for k, v in mod.state_dict().items()}
    _save_atomic(norm_state, root / NORMALIZERS)
    report = {"images": n, "views": recipe.cache.epochs, "bytes": stored, "raw_fp32_bytes": raw,
              "ratio": stored / max(raw, 1), "dtype": recipe.cache.dtype,
              "relative_error": (err_sum / max(ref_sum, 1e-30)) ** 0.5, "max_abs_error": err_max}
    manifest = {**trainer.cache_manifest(), "files": files, "report": report}
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)  # written last: its presence marks a complete cache
    return report


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
        if expected is not None:
            found = {k: self.manifest.get(k) for k in expected}
            diffs = dict_differences(found, expected)
            if diffs:
                raise StaleCacheError(f"the teacher cache at {self.root} does not match the recipe; rebuild it with "
                                      f"`lowres-kd cache RECIPE` (differences: " + "; ".join(diffs) + ")")
        self.files = {rel: _inside(self.root, rel) for rel in self.manifest["files"]}
        self.epochs = self.manifest["augmentation"]["epochs"]
        self.shard = self.manifest["shard_images"]
        self._open: Dict[str, object] = {}  # shard path -> safe_open handle: rows are read one by one

    def specs(self) -> Dict[str, dict]:
        return {name: t["spec"] for name, t in self.manifest["teachers"].items()}

    def normalizer_state(self, kind: str) -> Dict[str, Dict[str, torch.Tensor]]:
        """``{teacher: state_dict}`` of the normalisers fitted when the cache was built."""
        state = load_file(str(_inside(self.root, NORMALIZERS)))
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            k, name, buf = key.split(".", 2)
            if k == kind:
                out.setdefault(name, {})[buf] = value
        return out

    def _shard(self, name: str, epoch: int, shard: int):
        rel = f"{name}/e{epoch:03d}_s{shard:05d}.safetensors"
        if rel not in self.files:
            raise StaleCacheError(f"{self.root}: the manifest lists no shard {rel}")
        if rel not in self._open:  # memory-mapped: opening is cheap, a row read touches one row
            self._open[rel] = safe_open(str(self.files[rel]), framework="pt")
        return self._open[rel]

    @staticmethod
    def _row(shard, kind: str, r: int) -> torch.Tensor:
        parts = {key.split(".", 1)[1]: shard.get_slice(key)[r:r + 1][0] for key in shard.keys() if key.startswith(kind + ".")}
        return decode(parts)

    def targets(self, epoch: int, indices: torch.Tensor, device: torch.device) -> Dict[str, Features]:
        """Targets of images ``indices`` as cropped in training epoch ``epoch`` (view epoch mod E)."""
        view = epoch % self.epochs
        out = {}
        for name in self.manifest["teachers"]:
            g_rows, d_rows = [], []
            for i in indices.tolist():
                shard = self._shard(name, view, i // self.shard)
                r = i % self.shard
                if not bool(shard.get_slice("valid")[r:r + 1][0]):
                    raise StaleCacheError(f"{self.root}: image {i} was unreadable when the cache was built")
                g_rows.append(self._row(shard, "global", r))
                d_rows.append(self._row(shard, "dense", r))
            out[name] = Features(torch.stack(g_rows).to(device), torch.stack(d_rows).permute(0, 3, 1, 2).to(device))
        return out
