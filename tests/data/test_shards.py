"""Tar shards (WebDataset layout) as data.source: the same pixels, names and bad-item handling as
a folder of the same images, clear constructor errors, DataLoader workers, exact resume, and a
teacher cache equal to the folder's."""
import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import logged_losses, read_log, tiny_recipe_dict, tiny_recipe_from, train_to_end, write_photo_folder
from lowres_kd.cache import build_cache
from lowres_kd.config import RecipeError, recipe_from_dict
from lowres_kd.data import (BadImage, BadShards, EvalTransform, FolderSource, NoImages, ResumableSampler, ShardSource,
                            Skipped, TrainImages, build_source, collate_images, expand_braces, is_shard_pattern,
                            make_train_loader)
from lowres_kd.launch import trainer_for
from lowres_kd.rundir import checkpoint as ckpt

BAD = ("empty.jpg", "notes.png", "truncated.jpg")


def _add_bytes(tar, name, data=b"", kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shards(images, out, per_shard=5):
    """The files of ``images`` in sorted order, ``per_shard`` a shard, with WebDataset's other
    members beside them (labels, a folder entry, a macOS ``._`` file) that are not images."""
    files = sorted(p.name for p in images.iterdir())
    out.mkdir()
    chunks = [files[k:k + per_shard] for k in range(0, len(files), per_shard)]
    for k, chunk in enumerate(chunks):
        with tarfile.open(out / f"train-{k:06d}.tar", "w") as tar:
            _add_bytes(tar, "meta", kind=tarfile.DIRTYPE)
            for name in chunk:
                tar.add(images / name, arcname=name)
                _add_bytes(tar, name.rsplit(".", 1)[0] + ".cls", b"3")
            _add_bytes(tar, f"._{chunk[0]}", b"\0\5\26\7 AppleDouble")
    return str(out / f"train-{{000000..{len(chunks) - 1:06d}}}.tar")


@pytest.fixture
def images(tmp_path):
    write_photo_folder(tmp_path / "images", n_good=5, upright=True)
    return tmp_path / "images"


@pytest.fixture
def pattern(images, tmp_path):
    return _write_shards(images, tmp_path / "shards")


# --------------------------------------------------------------------------- patterns


@pytest.mark.parametrize("spec,names", [
    ("/d/train-{000000..000003}.tar", [f"/d/train-00000{k}.tar" for k in range(4)]),
    ("/d/{8..11}.tar", ["/d/8.tar", "/d/9.tar", "/d/10.tar", "/d/11.tar"]),
    ("/d/{1..010}.tar", [f"/d/{k:03d}.tar" for k in range(1, 11)]),  # padded to the wider end
    ("/d/{3..1}.tar", ["/d/3.tar", "/d/2.tar", "/d/1.tar"]),
    ("/d/{train,val}-{0..1}.tar", ["/d/train-0.tar", "/d/train-1.tar", "/d/val-0.tar", "/d/val-1.tar"]),
    ("/d/{a,b{1,2}}.tar", ["/d/a.tar", "/d/b1.tar", "/d/b2.tar"]),
    ("/d/one.tar", ["/d/one.tar"]),
    ("/d/{x}/a{b.tar", ["/d/{x}/a{b.tar"]),  # neither a range nor a list, one never closed: as written
])
def test_brace_expansion(spec, names):
    assert expand_braces(spec) == names


@pytest.mark.parametrize("spec", [
    "/d/train-{0..99999999999}.tar",  # a typo: eleven digits
    "/d/" + "{a,b}" * 20 + ".tar",  # 2 ** 20 names
])
def test_patterns_for_too_many_shards_are_refused_before_they_are_listed(spec):
    with pytest.raises(BadShards, match=rf"^{re.escape(repr(spec))} stands for more than 100000 names"):
        expand_braces(spec)


def test_which_specs_are_shards():
    assert is_shard_pattern("/d/train-{000..009}.tar") and is_shard_pattern("/d/{a.tar,b.tar}")
    assert is_shard_pattern("/d/ONE.TAR")
    assert not is_shard_pattern("/data/images") and not is_shard_pattern("embedded")


# --------------------------------------------------------------------------- reading


def test_shards_give_the_folder_images_pixel_for_pixel(images, pattern):
    shards, folder = build_source(pattern), build_source(str(images))
    assert isinstance(shards, ShardSource) and isinstance(folder, FolderSource)
    assert len(shards) == len(folder) == 12 and len(shards.shards) == 3
    assert shards.name(0) == "train-000000.tar/empty.jpg" and shards.name(11) == "train-000002.tar/upright.jpg"
    assert [n.split("/", 1)[1] for n in shards.names()] == folder.names()  # tar order is the folder's order
    assert shards.others == 3 * 2 + 12  # per shard a folder entry and a ._ file; every .cls
    readable = 0
    for i in range(len(folder)):
        if folder.name(i) in BAD:
            continue
        a, b = shards.load(i), folder.load(i)
        assert a.mode == b.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b)), folder.name(i)
        readable += 1
    assert readable == 9
    assert shards.load(11).size == (64, 80)  # EXIF orientation applied


def test_bad_members_are_skipped_and_counted_like_bad_files(images, pattern):
    shard_items = [TrainImages(ShardSource(pattern), EvalTransform(32))[i] for i in range(12)]
    folder_items = [TrainImages(FolderSource(images), EvalTransform(32))[i] for i in range(12)]
    batch, skipped = collate_images(shard_items, size=32)
    assert batch.shape == (9, 3, 32, 32)
    assert sorted(name for name, _ in skipped) == [f"train-00000{k}.tar/{n}" for k, n in ((0, BAD[0]), (1, BAD[1]),
                                                                                          (2, BAD[2]))]
    for shard_item, folder_item in zip(shard_items, folder_items):
        assert isinstance(shard_item, Skipped) == isinstance(folder_item, Skipped)
        if isinstance(shard_item, Skipped):  # the same reason, word for word
            assert shard_item.reason == folder_item.reason and Path(shard_item.name).name == Path(folder_item.name).name
        else:
            assert torch.equal(shard_item, folder_item)
    kinds = {reason.split(":")[0] for _, reason in skipped}
    assert kinds == {"empty file", "not an image", "truncated"}


def test_a_shard_cut_short_or_removed_after_indexing(images, pattern, tmp_path):
    source = ShardSource(pattern)
    last = tmp_path / "shards" / "train-000002.tar"
    last.write_bytes(last.read_bytes()[:2048])  # its first members survive, the rest are cut off
    with pytest.raises(BadImage, match=r"train-000002\.tar/upright\.jpg: truncated: the shard ends after 0 of"):
        source.load(11)
    (tmp_path / "shards" / "train-000001.tar").unlink()
    with pytest.raises(BadImage, match=r"train-000001\.tar/good_4\.jpg: missing: .*No such file"):
        source.load(5)


def test_constructor_errors_name_the_pattern_or_the_file(images, pattern, tmp_path):
    shards = tmp_path / "shards"
    cases = [
        (str(shards / "train-{000000..000004}.tar"),
         r"2 of 5 shard file\(s\) do not exist, the first is '.*/train-000003\.tar'"),
        (str(tmp_path / "nowhere-{0..9}.tar"), r"10 of 10 shard file\(s\) do not exist, the first is '.*/nowhere-0\.tar'"),
    ]
    (tmp_path / "notes.tar").write_text("a shopping list, not a tar archive" * 20)
    (tmp_path / "empty.tar").write_bytes(b"")
    with tarfile.open(tmp_path / "zipped.tar", "w:gz") as tar:
        tar.add(images / "good_0.jpg", arcname="good_0.jpg")
    for name in ("notes", "empty", "zipped"):
        cases.append((str(tmp_path / f"{name}.tar"), rf"tar shard '.*/{name}\.tar' is not an uncompressed tar archive"))
    with tarfile.open(tmp_path / "labels.tar", "w") as tar:
        _add_bytes(tar, "a.cls", b"1")
        _add_bytes(tar, "a.json", b"{}")
    cases.append((str(tmp_path / "{labels,labels}.tar"), r"'.*/\{labels,labels\}\.tar': 2 shard\(s\) hold no image "
                                                          r"member \(.*; 4 other member\(s\) found\)"))
    for spec, message in cases:
        with pytest.raises((BadShards, NoImages), match=message) as info:
            build_source(spec)
        assert "\n" not in str(info.value)


def test_recipe_checks_that_the_shards_exist(pattern, tmp_path):
    assert recipe_from_dict(tiny_recipe_dict(tmp_path / "run", data={"source": pattern})).data.source == pattern
    missing = pattern.replace("000002}", "000003}")
    with pytest.raises(RecipeError, match=r"data.source: tar shards '.*': 1 of 4 shard file\(s\) do not exist"):
        recipe_from_dict(tiny_recipe_dict(tmp_path / "run", data={"source": missing}))
    with pytest.raises(RecipeError, match=r"data.source: '/no/such/place' is not allowed; 'embedded', an existing "
                                          r"folder, or tar shards"):
        recipe_from_dict(tiny_recipe_dict(tmp_path / "run", data={"source": "/no/such/place"}))


def test_pickled_source_reads_the_same_and_workers_read_their_own_files(pattern):
    source = ShardSource(pattern)
    first = np.asarray(source.load(3))  # leaves shard 0 open in this process
    copy = pickle.loads(pickle.dumps(source))
    assert copy.names() == source.names() and np.array_equal(np.asarray(copy.load(3)), first)
    dataset = TrainImages(source, EvalTransform(32))
    expected = collate_images([dataset[i] for i in range(len(dataset))], size=32)[0]
    loader = make_train_loader(dataset, 2, ResumableSampler(len(dataset), shuffle=False), num_workers=2, drop_last=False)
    got = torch.cat([images for images, _ in loader])  # forked workers, each reading every shard
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------- training and cache

# Two teachers and a normaliser without an eigendecomposition: what is tested is the data, in seconds.
SMALL = dict(teachers=[{"name": "mobilenet", "family": "mobilenet_v2", "input_size": 64, "base": True},
                       {"name": "edges", "family": "hed", "input_size": 64}],
             space={"calibration_images": 8, "normalizer": "standardize"},
             train={"steps": 4, "batch_size": 4, "checkpoint_every": 2})


@pytest.mark.slow
def test_training_on_shards_resumes_exactly(pattern, tmp_path):
    data = {"source": pattern, "fashion_mnist": 0}
    straight = train_to_end(tiny_recipe_from(tmp_path / "straight", data=data, **SMALL))
    assert isinstance(straight.source, ShardSource)
    expected = logged_losses(straight.run_dir)
    assert len(expected) == 4 and all(np.isfinite(expected))
    listed = (straight.run_dir / "bad_images.log").read_text()
    assert all(f"/{name}: " in listed for name in BAD) and "train-000000.tar/empty.jpg: empty file" in listed

    broken = trainer_for(tiny_recipe_from(tmp_path / "broken", data=data, **SMALL), progress=False).setup()
    broken.recipe.train.steps = 2  # stop after the first checkpoint, as a crash would
    broken.train()
    assert [p.name for p in ckpt.step_checkpoints(broken.run_dir)] == ["step_0000002"]
    resumed = trainer_for(tiny_recipe_from(tmp_path / "broken", data=data, **SMALL), resume=True, progress=False)
    resumed.setup().train()
    assert logged_losses(broken.run_dir) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert [int(r["step"]) for r in read_log(broken.run_dir)] == [1, 2, 3, 4]


def _cache_of(source, tmp_path, name):
    recipe = tiny_recipe_from(tmp_path / name, data={"source": source, "fashion_mnist": 0}, **SMALL,
                              cache={"epochs": 1, "shard_images": 8, "dir": str(tmp_path / name / "cache")})
    build_cache(recipe, progress=False)
    return recipe.cache_dir


@pytest.mark.slow
def test_teacher_cache_from_shards_equals_the_folder_one(images, pattern, tmp_path):
    from_shards, from_folder = _cache_of(pattern, tmp_path, "shards_run"), _cache_of(str(images), tmp_path, "folder_run")
    files = sorted(p.relative_to(from_folder) for p in from_folder.rglob("*.safetensors"))
    assert len(files) == 2 * 2 + 1  # 2 teachers x 2 cache shards of 8 images, and the normalisers
    assert sorted(p.relative_to(from_shards) for p in from_shards.rglob("*.safetensors")) == files
    for rel in files:
        a, b = load_file(str(from_shards / rel)), load_file(str(from_folder / rel))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{rel}: {key}"
    manifests = [json.loads((root / "manifest.json").read_text()) for root in (from_shards, from_folder)]
    for m in manifests:
        assert m["images"]["count"] == 12
        del m["images"]["source"], m["images"]["sha1"]  # the names differ: train-000000.tar/good_0.jpg, good_0.jpg
    assert manifests[0] == manifests[1]
