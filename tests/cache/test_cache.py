"""The teacher feature cache: round trip, training with no teacher loaded, stale caches refused."""
import json

import pytest
import torch

from helpers import tiny_recipe_dict
from lowres_kd.cache import (MANIFEST, StaleCacheError, TargetCache, build_cache, cache_manifest, decode, encode,
                             prepare_targets)
from lowres_kd.config import recipe_from_dict
from lowres_kd.training.trainer import Trainer


def recipe(tmp_path, **sections):
    base = dict(cache={"epochs": 2, "shard_images": 16, "dir": str(tmp_path / "cache")},
                data={"fashion_mnist": 4}, train={"steps": 3, "checkpoint_every": 100})
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe_from_dict(tiny_recipe_dict(tmp_path / "run", **base))


@pytest.mark.parametrize("dtype,tol", [("fp16", 1e-3), ("int8", 1e-2)])
def test_storage_dtypes_round_trip(dtype, tol):
    x = torch.randn(50, 37) * torch.logspace(-2, 2, 50)[:, None]
    back = decode(encode(x, dtype))
    rel = (back - x).norm(dim=1) / x.norm(dim=1)
    assert float(rel.max()) < tol


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_cache_round_trip_matches_live_targets(tmp_path, dtype):
    r = recipe(tmp_path, cache={"dtype": dtype})
    report = build_cache(r, progress=False)
    assert report["bytes"] < report["raw_fp32_bytes"] * (0.6 if dtype == "fp16" else 0.35)
    assert report["relative_error"] < (1e-3 if dtype == "fp16" else 1e-2)
    data, model, live = prepare_targets(r, progress=False)
    cache = TargetCache(r.cache_dir, expected=cache_manifest(r, data.source.names(), model.specs))
    for epoch in (0, 1, 3):  # epoch 3 reuses view 1
        data.augmented.set_epoch(epoch % 2)
        idx = torch.tensor([0, 5, 17, 20])  # across two shards
        images = torch.stack([data.augmented[int(i)] for i in idx])
        with torch.no_grad():
            expected = {n: model.normalise(n, f) for n, f in live.features(images).items()}
        got = cache.targets(epoch, idx, torch.device("cpu"))
        for name, f in expected.items():
            for a, b in ((got[name].global_, f.global_), (got[name].dense, f.dense)):
                assert a.shape == b.shape
                assert float((a - b).norm() / b.norm()) < (2e-3 if dtype == "fp16" else 2e-2)


def test_training_from_cache_loads_no_teacher(tmp_path):
    r = recipe(tmp_path)
    build_cache(r, progress=False)
    cached = recipe(tmp_path, teachers_from="cache", output_dir=str(tmp_path / "from_cache"))
    trainer = Trainer(cached, progress=False).setup()
    assert trainer.teachers == {}  # the base lives in the student (adapter); no other teacher is built
    last = trainer.train()
    assert last["step"] == 3 and torch.isfinite(torch.tensor(last["loss"]))


def test_stale_or_hostile_caches_are_refused(tmp_path):
    r = recipe(tmp_path)
    build_cache(r, progress=False)
    other = recipe(tmp_path, teachers_from="cache", data={"image_size": 48}, output_dir=str(tmp_path / "o1"))
    with pytest.raises(StaleCacheError, match=r"augmentation.image_size: cache has 64, recipe has 48"):
        Trainer(other, progress=False).setup()
    changed = recipe(tmp_path, teachers_from="cache", space={"normalizer": "standardize"}, output_dir=str(tmp_path / "o2"))
    with pytest.raises(StaleCacheError, match="normalizer: cache has 'phi-s', recipe has 'standardize'"):
        Trainer(changed, progress=False).setup()
    manifest = json.loads((r.cache_dir / MANIFEST).read_text())
    manifest["files"][0] = "../../etc/passwd"
    (r.cache_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StaleCacheError, match="points outside the cache folder"):
        TargetCache(r.cache_dir)
    (r.cache_dir / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="lowres-kd cache"):
        TargetCache(r.cache_dir)


def test_hybrid_run_loads_only_its_live_teachers(tmp_path):
    """effnet ``cache: false``: the cache holds the others, training builds effnet alone."""
    teachers = tiny_recipe_dict(tmp_path)["teachers"]
    teachers[1] = {**teachers[1], "cache": False}
    r = recipe(tmp_path, teachers=teachers)
    build_cache(r, progress=False)
    held = json.loads((r.cache_dir / MANIFEST).read_text())["teachers"]
    assert "effnet" not in held and "edges" in held
    hybrid = recipe(tmp_path, teachers=teachers, teachers_from="cache", output_dir=str(tmp_path / "hybrid"))
    trainer = Trainer(hybrid, progress=False).setup()
    assert set(trainer.teachers) == {"effnet"}  # asserted: the cached edges teacher is never built
    last = trainer.train()
    assert last["step"] == 3 and torch.isfinite(torch.tensor(last["loss"]))
    assert all(f"{t}/dense" in last for t in ("mobilenet", "effnet", "edges"))  # cached and live terms alike
