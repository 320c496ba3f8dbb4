"""``lowres-kd cache RECIPE``: the cached teachers (``cache: true``) run once over ``cache.epochs``
augmented views of every image; their normalised targets land in shards that training reads
back (``store``).

With ``cache.rank`` a PCA basis per teacher and kind is fitted next (``rank``) and the shards hold
coefficients; the report gives each teacher's bytes per image and view and the mean cosine of
the targets as training reads them back to the exact ones.

The build resumes. The normalisers (and the basis) are fitted first and saved; ``progress.json`` then records
each finished view-shard (its files' sha256 and its share of the report) after its files are
written, flushed and renamed into place. A rerun whose recipe still gives the same manifest
loads those normalisers (and basis), keeps the shards whose files still have their recorded hash and
computes the rest; every target depends only on (seed, view, image), so the finished cache is
byte for byte the one an uninterrupted build writes. ``manifest.json``, written last, replaces
``progress.json``: only then may training read the cache.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from ..build import build_model, build_student_and_teachers, teacher_specs, training_images
from ..device import resolve_device
from ..errors import UserError
from ..rundir.checkpoint import sha256_file
from ..rundir.lock import RunLock
from ..schema import Recipe
from ..targets import TeacherTargets
from .rank import BASIS, KINDS, basis_of, check_rank, fit_bases, project, reconstruct, training_views
from .store import (MANIFEST, NORMALIZERS, cache_manifest, decode, encode, load_normalizers, normalizer_tensors,
                    remove_temporaries, save_atomic, save_json_atomic)

PROGRESS = "progress.json"  # an unfinished build: what it is building and the view-shards done


def build_cache(recipe: Recipe, progress: bool = True) -> dict:
    """Run the cached teachers over ``cache.epochs`` views of every image, continuing an
    interrupted build of the same cache; returns the cache report. ``memory: auto`` recipes
    must be planned first (``lowres_kd.launch.planned``)."""
    if not recipe.cached_teachers:
        raise UserError("teachers[*].cache: no teacher has cache: true, so there is nothing to cache")
    with RunLock(recipe.run_dir):  # no trainer may read the cache of this run while it is rewritten
        return _build_cache(recipe, progress)


def prepare_targets(recipe: Recipe, progress: bool = True):
    """(training images, model, targets) of the cached teachers: prepared, their normalisers
    fitted and their fidelity checked, as a training run has them at its first step."""
    data, model, targets = _prepare(recipe, progress)
    _fit(recipe, model, targets, None)
    return data, model, targets


def _prepare(recipe: Recipe, progress: bool):
    device = resolve_device(recipe.train.device)
    torch.manual_seed(recipe.train.seed)
    data = training_images(recipe)
    names = [t.name for t in recipe.cached_teachers]
    student, teachers = build_student_and_teachers(recipe, names=names)
    model = build_model(recipe, student, teacher_specs(recipe, student, teachers, names), device)
    targets = TeacherTargets(recipe, model, teachers, device, data.calibration,
                             bf16=device.type == "cuda" and recipe.train.bf16, progress=progress,
                             run_dir=recipe.run_dir, names=names).prepare()
    return data, model, targets


def _fit(recipe: Recipe, model, targets: TeacherTargets, normalizers: Optional[Dict[str, torch.Tensor]]) -> None:
    if normalizers is None:
        targets.calibrate()
    else:
        load_normalizers(model, normalizers, list(model.specs))
    targets.check_fidelity(recipe.run_dir)


def _as_json(value):
    return json.loads(json.dumps(value))


def _done_shards(root: Path, expected: dict) -> Optional[Dict[str, dict]]:
    """The view-shards an interrupted build of this same cache finished (their files intact),
    or None when there is nothing to continue."""
    try:
        state = json.loads((root / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if state.get("manifest") != expected or not (root / NORMALIZERS).is_file() \
            or sha256_file(root / NORMALIZERS) != state.get("normalizers"):
        return None
    if expected["rank"] and (not (root / BASIS).is_file() or sha256_file(root / BASIS) != state.get("basis")):
        return None
    return {key: done for key, done in state["done"].items()
            if all((root / rel).is_file() and sha256_file(root / rel) == digest for rel, digest in done["sha256"].items())}


def _build_cache(recipe: Recipe, progress: bool) -> dict:
    data, model, targets = _prepare(recipe, progress)
    root = recipe.cache_dir
    root.mkdir(parents=True, exist_ok=True)
    remove_temporaries(root)
    expected = _as_json(cache_manifest(recipe, data.source.names(), model.specs))
    done = _done_shards(root, expected)
    rank, dataset = recipe.cache.rank, data.augmented
    if rank:
        check_rank(rank, model.specs)
    if done is None:  # a fresh build: whatever was here no longer counts as a cache
        (root / MANIFEST).unlink(missing_ok=True)
        (root / PROGRESS).unlink(missing_ok=True)
        _fit(recipe, model, targets, None)
        save_atomic(normalizer_tensors(model, list(model.specs)), root / NORMALIZERS)
        if rank:
            save_atomic(_fit_bases(recipe, model, targets, dataset, progress), root / BASIS)
        done = {}
    else:
        _fit(recipe, model, targets, load_file(str(root / NORMALIZERS)))
    bases = load_file(str(root / BASIS)) if rank else None
    state = {"manifest": expected, "normalizers": sha256_file(root / NORMALIZERS),
             "basis": sha256_file(root / BASIS) if rank else None, "done": done}
    save_json_atomic(state, root / PROGRESS)

    n, shard = len(dataset), recipe.cache.shard_images
    views = [(e, s) for e in range(recipe.cache.epochs) for s in range(0, n, shard)]
    keys = [f"e{e:03d}_s{s // shard:05d}" for e, s in views]
    finished = sum(min(n, s + shard) - s for (e, s), key in zip(views, keys) if key in done)
    if done:
        tqdm.write(f"cache {root}: continuing an interrupted build, {len(done)} of {len(views)} shards done")
    model.eval()
    with tqdm(total=n * recipe.cache.epochs, initial=finished, desc="cache", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for (epoch, start), key in zip(views, keys):
            if key in done:
                continue
            dataset.set_epoch(epoch)
            done[key] = _write_view_shard(recipe, model, targets, dataset, root, key, range(start, min(n, start + shard)),
                                          bar, bases)
            save_json_atomic(state, root / PROGRESS)  # only now is this view-shard done
    records = [done[key] for key in keys]
    err_sum, ref_sum = sum(r["err_sum"] for r in records), sum(r["ref_sum"] for r in records)
    report = {"images": n, "views": recipe.cache.epochs, "bytes": sum(r["bytes"] for r in records),
              "raw_fp32_bytes": sum(r["raw"] for r in records), "dtype": recipe.cache.dtype,
              "relative_error": (err_sum / max(ref_sum, 1e-30)) ** 0.5,
              "max_abs_error": max(r["err_max"] for r in records)}
    report["ratio"] = report["bytes"] / max(report["raw_fp32_bytes"], 1)
    report["teachers"] = _teacher_report(records, n * recipe.cache.epochs)
    files = [rel for r in records for rel in r["sha256"]]
    save_json_atomic({**expected, "basis_sha256": state["basis"], "files": files, "report": report},
                     root / MANIFEST)  # last: the cache is complete
    (root / PROGRESS).unlink()
    return report


def _fit_bases(recipe: Recipe, model, targets: TeacherTargets, dataset, progress: bool) -> Dict[str, torch.Tensor]:
    """The PCA bases of the cached teachers on the first ``cache.rank_images`` views it holds."""
    c, rank = recipe.cache, recipe.cache.rank
    views = training_views(dataset, c.rank_images, recipe.train.batch_size, c.epochs)
    bases, rows = fit_bases(lambda images: targets.normalised(images.to(targets.device)), views, rank,
                            list(model.specs), progress)
    for key, count in rows.items():
        if f"{key}.basis" not in bases:
            tqdm.write(f"note: cache {key} stored whole: its basis would see {count} rows, no more than rank "
                       f"{rank} (more cache.rank_images, or more cached views, reduce it)")
    return bases


def _teacher_report(records: List[dict], views: int) -> Dict[str, dict]:
    """Per teacher: stored bytes per image and view, and the mean cosine of the targets read back
    to the exact ones, per kind (global: a row an image, dense: a row a token)."""
    out: Dict[str, dict] = {}
    for r in records:
        for name, kinds in r["teachers"].items():
            t = out.setdefault(name, {"bytes": 0, **{k: {"cos_sum": 0.0, "rows": 0} for k in KINDS}})
            t["bytes"] += kinds["bytes"]
            for k in KINDS:
                t[k]["cos_sum"] += kinds[k]["cos_sum"]
                t[k]["rows"] += kinds[k]["rows"]
    return {name: {"bytes_per_image_view": t["bytes"] / max(views, 1),
                   **{f"{k}_cosine": t[k]["cos_sum"] / max(t[k]["rows"], 1) for k in KINDS}}
            for name, t in out.items()}


def _write_view_shard(recipe: Recipe, model, targets: TeacherTargets, dataset, root: Path, key: str, idx: range,
                      bar: tqdm, bases: Optional[Dict[str, torch.Tensor]] = None) -> dict:
    """Targets of images ``idx`` in the dataset's current view, one file per cached teacher (PCA
    coefficients with ``bases``); returns the view-shard's record for ``progress.json``."""
    names = list(model.specs)
    rows: Dict[str, Dict[str, list]] = {t: {"global": [], "dense": []} for t in names}
    valid = torch.zeros(len(idx), dtype=torch.bool)
    bs = recipe.train.batch_size
    for b in range(0, len(idx), bs):
        items = [dataset[i] for i in idx[b:b + bs]]
        ok = [j for j, it in enumerate(items) if torch.is_tensor(it)]
        bar.update(len(items))
        if not ok:
            continue
        positions = [b + j for j in ok]
        valid[positions] = True
        images = torch.stack([items[j] for j in ok]).to(targets.device)
        with torch.no_grad():
            for name, f in targets.normalised(images).items():
                rows[name]["global"].append((positions, f.global_.cpu()))
                rows[name]["dense"].append((positions, f.dense.permute(0, 2, 3, 1).cpu()))  # rows = tokens
    record = {"sha256": {}, "bytes": 0, "raw": 0, "err_sum": 0.0, "ref_sum": 0.0, "err_max": 0.0, "teachers": {}}
    for name in names:
        tensors = {"valid": valid}
        spec = model.specs[name]
        stats = record["teachers"][name] = {}
        for kind, chunks in rows[name].items():
            width = spec.global_dim if kind == "global" else spec.dense_dim
            shape = (len(idx), width) if kind == "global" else (len(idx), *spec.grid, width)
            full = torch.zeros(shape)
            for positions, values in chunks:
                full[positions] = values.float()
            pair = basis_of(bases, kind, name)
            parts = encode(full if pair is None else project(full, *pair), recipe.cache.dtype)
            read_back = decode(parts) if pair is None else reconstruct(decode(parts), *pair)
            err = (read_back - full)[valid]
            record["err_sum"] += float(err.pow(2).sum())
            record["ref_sum"] += float(full[valid].pow(2).sum())
            record["err_max"] = max(record["err_max"], float(err.abs().max()) if err.numel() else 0.0)
            record["raw"] += full[valid].numel() * 4
            if kind == "dense":  # (N, h, w, C) -> rows of tokens
                read_back, full = read_back.flatten(1, 2), full.flatten(1, 2)
            cos = torch.nn.functional.cosine_similarity(read_back[valid], full[valid], dim=-1)
            stats[kind] = {"cos_sum": float(cos.double().sum()), "rows": cos.numel()}
            for part, value in parts.items():
                tensors[f"{kind}.{part}"] = value
        rel = f"{name}/{key}.safetensors"
        save_atomic(tensors, root / rel)
        stats["bytes"] = (root / rel).stat().st_size
        record["bytes"] += stats["bytes"]
        record["sha256"][rel] = sha256_file(root / rel)
    return record
