"""Teachers: the registry sweep, real shipped weights on real photos, local files, safety."""
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage import data as skdata

from lowres_kd.config import TeacherConfig
from lowres_kd.data import EvalTransform
from lowres_kd.teachers import TEACHERS, Features, build_teacher, small_random_config
from lowres_kd.teachers.weights import load_state_dict

def photo(name: str, size: int = 224) -> torch.Tensor:
    return EvalTransform(size)(getattr(skdata, name)())[None]


@pytest.mark.parametrize("family", TEACHERS.list())
def test_every_family_gives_global_and_dense(family):
    teacher = build_teacher(small_random_config(family)).freeze()
    images = torch.rand(2, 3, 50, 70)  # any size: the teacher resizes
    with torch.no_grad():
        f = teacher(images)
    assert isinstance(f, Features)
    spec = teacher.spec
    assert f.global_.shape == (2, spec.global_dim)
    assert f.dense.shape == (2, spec.dense_dim, *spec.grid)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        teacher(torch.rand(2, 50, 70))


@pytest.mark.parametrize("family,name,cls", [
    ("mobilenet_v2", "chelsea", 285), ("mobilenet_v2", "coffee", 967),
    ("efficientnet_lite0", "chelsea", 285), ("efficientnet_lite0", "coffee", 967),
])
def test_shipped_classifiers_recognise_real_photos(family, name, cls):
    teacher = build_teacher(TeacherConfig(name="t", family=family)).freeze()
    with torch.no_grad():
        logits = teacher.classify(photo(name))
    assert int(logits.argmax()) == cls


def test_shipped_hed_finds_real_edges():
    """HED's edge map follows image gradients on a real photo (converted Keras weights)."""
    hed = build_teacher(TeacherConfig(name="e", family="hed", input_size=128)).freeze()
    image = photo("camera", 128)
    with torch.no_grad():
        edges = hed.edge_map(image)[0, 0]
        gray = image[0].mean(0)
        gx = torch.nn.functional.conv2d(gray[None, None], torch.tensor([[[[-1.0, 0, 1]] * 3]]), padding=(1, 1))[0, 0]
        gy = torch.nn.functional.conv2d(gray[None, None], torch.tensor([[[[-1.0, 0, 1]] * 3]]).transpose(2, 3), padding=(1, 1))[0, 0]
        grad = (gx**2 + gy**2).sqrt()
    assert edges.shape == (128, 128) and 0 <= float(edges.min()) and float(edges.max()) <= 1
    corr = np.corrcoef(edges.flatten().numpy(), grad.flatten().numpy())[0, 1]
    assert corr > 0.4, corr
    # a flat image has (almost) no edges away from the border
    with torch.no_grad():
        flat = hed.edge_map(torch.full((1, 3, 128, 128), 0.5))[0, 0, 16:-16, 16:-16]
    assert float(flat.mean()) < 0.5 * float(edges.mean())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_timm_teacher_from_local_file(tmp_path, suffix):
    """A local checkpoint (what hub weights become offline) loads exactly."""
    cfg = dict(name="v", family="timm", model="vit_tiny_patch16_224", input_size=64)
    source = build_teacher(TeacherConfig(weights="none", **cfg)).freeze()
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in source.net.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = build_teacher(TeacherConfig(weights=str(path), **cfg)).freeze()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = source(x), loaded(x)
    assert torch.equal(a.global_, b.global_) and torch.equal(a.dense, b.dense)
    assert a.dense.shape == (2, 192, 4, 4)


def test_wrong_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"foo": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="does not fit timm model"):
        build_teacher(TeacherConfig(name="v", family="timm", model="vit_tiny_patch16_224", weights=str(path)))


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickles_that_run_code_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict(path)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_state_dict(tmp_path / "absent.pt")


def test_dense_grid_pools_a_fine_map_and_says_so_in_the_spec():
    """``dense_grid`` average-pools a map finer than it (HED's stride-4 side outputs here) and
    leaves a coarser one alone; the spec's grid is what the teacher then returns."""
    images = photo("chelsea", 64)
    full = build_teacher(TeacherConfig(name="e", family="hed", input_size=64)).freeze()
    pooled = build_teacher(TeacherConfig(name="e", family="hed", input_size=64, dense_grid=4)).freeze()
    coarse = build_teacher(TeacherConfig(name="e", family="hed", input_size=64, dense_grid=1000)).freeze()
    with torch.no_grad():
        f, p, c = full(images), pooled(images), coarse(images)
    assert full.spec.grid == (16, 16) and pooled.spec.grid == (4, 4) and coarse.spec.grid == (16, 16)
    assert p.dense.shape[-2:] == (4, 4)
    torch.testing.assert_close(p.dense, torch.nn.functional.avg_pool2d(f.dense, 4))
    torch.testing.assert_close(c.dense, f.dense)
    torch.testing.assert_close(p.global_, f.global_)
