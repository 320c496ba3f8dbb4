"""Rank-reduced caches (cache.rank): the PCA basis against float64 SVD, targets read back within
the truncation error plus the storage dtype's, bad ranks and stale bases refused."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny_recipe_dict
from lowres_kd.cache import StaleCacheError, TargetCache, build_cache, cache_manifest, prepare_targets
from lowres_kd.cache.rank import BASIS, Moments, RankTooLarge, project, reconstruct
from lowres_kd.config import recipe_from_dict
from lowres_kd.training.trainer import ResumeMismatch, Trainer


def recipe(tmp_path, name="run", **sections):
    base = dict(cache={"epochs": 2, "shard_images": 16, "dir": str(tmp_path / "cache"), "rank_images": 64},
                data={"fashion_mnist": 4}, train={"steps": 2, "checkpoint_every": 2})
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe_from_dict(tiny_recipe_dict(tmp_path / name, **base))


@pytest.mark.parametrize("n,c,rank", [(300, 40, 5), (97, 23, 11), (1000, 64, 64)])
def test_basis_spans_the_float64_principal_subspace(n, c, rank):
    signal = torch.randn(n, rank) @ torch.randn(rank, c) * 3
    x = (signal + 0.01 * torch.randn(n, c) + torch.randn(c)).float()
    m = Moments(c)
    for part in torch.split(x, [17, 1, n - 18]):  # ragged batches
        m.update(part)
    mean, basis = m.basis(rank)
    x64 = x.double().numpy()
    centred = x64 - x64.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    want = vt[:rank].T @ vt[:rank]  # the projector onto the top-rank subspace
    got = basis.double().numpy() @ basis.double().numpy().T
    assert np.abs(got - want).max() < 1e-4
    assert np.allclose(mean.numpy(), x64.mean(0), atol=1e-4)
    back = reconstruct(project(x, mean, basis), mean, basis)
    best = centred @ want + x64.mean(0)  # the float64 rank-`rank` reconstruction
    assert np.abs(back.double().numpy() - best).max() < 1e-3 * np.abs(x64).max()
    again = Moments(c)
    again.update(x.flip(0))  # another summation order: the same vectors, the same signs
    assert torch.allclose(again.basis(rank)[1], basis, atol=1e-4)


@pytest.mark.slow  # three tiny cache builds: about 60 s on 2 cores
@pytest.mark.parametrize("dtype,rank,tol", [("fp16", 8, 2e-3), ("int8", 48, 2e-2), ("int8", 160, 2e-2)])
def test_targets_read_back_within_truncation_plus_storage_error(tmp_path, dtype, rank, tol):
    r = recipe(tmp_path, cache={"dtype": dtype, "rank": rank})
    report = build_cache(r, progress=False)
    assert set(report["teachers"]) == {"mobilenet", "effnet", "edges"}
    bases = load_file(str(r.cache_dir / BASIS))
    data, model, live = prepare_targets(r, progress=False)
    global_rows = min(r.cache.rank_images, r.cache.epochs * len(data.source))  # one a view
    # a basis fitted on no more rows than its rank would span only the views it saw: stored whole
    assert ("global.effnet.basis" in bases) == (global_rows > rank)
    assert bases["dense.effnet.basis"].shape == (1280, rank)
    assert "dense.edges.basis" not in bases  # HED's 6 dense channels: stored whole
    cache = TargetCache(r.cache_dir, expected=cache_manifest(r, data.source.names(), model.specs))
    for epoch in (0, 1):  # view 1 was not seen by the basis fit
        data.augmented.set_epoch(epoch)
        idx = torch.tensor([0, 5, 17, 20])
        images = torch.stack([data.augmented[int(i)] for i in idx])
        with torch.no_grad():
            exact = {n: model.normalise(n, f) for n, f in live.features(images).items()}
        got = cache.targets(epoch, idx, torch.device("cpu"))
        for name, f in exact.items():
            for kind, a, b in (("global", got[name].global_, f.global_), ("dense", got[name].dense, f.dense)):
                assert a.shape == b.shape
                rows_a, rows_b = (a, b) if kind == "global" else (a.movedim(1, -1), b.movedim(1, -1))
                truncation = 0.0
                if f"{kind}.{name}.basis" in bases:
                    mean, basis = (bases[f"{kind}.{name}.{k}"].double() for k in ("mean", "basis"))
                    best = reconstruct(project(rows_b.double(), mean, basis), mean, basis)
                    truncation = float((best - rows_b.double()).norm() / rows_b.norm())
                err = float((rows_a - rows_b).norm() / rows_b.norm())
                assert err <= truncation + tol, (name, kind, epoch)
    for name, t in report["teachers"].items():
        assert 0.0 < t["global_cosine"] <= 1.0 + 1e-6 and 0.0 < t["dense_cosine"] <= 1.0 + 1e-6
        assert t["bytes_per_image_view"] > 0


def test_a_rank_that_reduces_nothing_is_refused(tmp_path):
    with pytest.raises(RankTooLarge, match=r"cache.rank: 1280 is not smaller than any cached teacher's width"
                                           r".*effnet global 1280"):
        build_cache(recipe(tmp_path, cache={"rank": 1280}), progress=False)
    assert not (tmp_path / "cache" / BASIS).exists()


@pytest.mark.slow  # a tiny cache build and two 2-step runs: about 40 s on 2 cores
def test_another_rank_or_a_changed_basis_is_refused(tmp_path):
    r = recipe(tmp_path, cache={"rank": 8})
    build_cache(r, progress=False)
    other = recipe(tmp_path, "o1", teachers_from="cache", cache={"rank": 16})
    with pytest.raises(StaleCacheError, match="rank: cache has 8, recipe has 16"):
        Trainer(other, progress=False).setup()

    trained = recipe(tmp_path, "t", teachers_from="cache", cache={"rank": 8})
    last = Trainer(trained, progress=False).setup().train()
    assert last["step"] == 2 and torch.isfinite(torch.tensor(last["loss"]))

    path = r.cache_dir / "normalizers.safetensors"
    norms = load_file(str(path))
    key = next(k for k in norms if k.endswith("mean"))
    norms[key] = norms[key] + 1.0  # as if the cache had been rebuilt with other normalisers
    save_file(norms, str(path))
    longer = recipe(tmp_path, "t", teachers_from="cache", cache={"rank": 8}, train={"steps": 4})
    with pytest.raises(ResumeMismatch, match="teacher cache .* was rebuilt since"):
        Trainer(longer, progress=False, resume=True).setup()

    basis = load_file(str(r.cache_dir / BASIS))
    basis["global.effnet.basis"] = -basis["global.effnet.basis"]
    save_file(basis, str(r.cache_dir / BASIS))
    with pytest.raises(StaleCacheError, match="basis.safetensors: missing or not the basis"):
        TargetCache(r.cache_dir)
