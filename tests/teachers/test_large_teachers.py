"""DINOv2, CLIP and SAM through timm: small models of each family, random weights saved to local
files, loaded by the families and compared with timm's own models (real timm, no mocks)."""
import copy
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lowres_kd.config import StudentConfig, TeacherConfig, recipe_from_dict
from lowres_kd.model import Student
from lowres_kd.teachers import build_teacher, can_be_student
from lowres_kd.build import build_student_and_teachers
from helpers import tiny_recipe_dict

# (family, small timm model of the family, input size) -> expected grid
SMALL = {
    "dinov2": ("dinov2", "vit_small_patch14_dinov2", 70, (5, 5)),
    "dinov2_reg4": ("dinov2", "vit_small_patch14_reg4_dinov2", 70, (5, 5)),
    "clip": ("clip", "vit_xsmall_patch16_clip_224.tinyclip_yfcc15m", 64, (4, 4)),
    "sam": ("sam", "samvit_base_patch16", 128, (8, 8)),
}


def random_timm_file(path, model: str, **kwargs) -> torch.nn.Module:
    """A timm model with random weights (every tensor perturbed: SAM's position tables start at
    zero), saved as a state dict to ``path`` (.safetensors, or torch.save otherwise)."""
    net = timm.create_model(model, num_classes=0, **kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    return net


def timm_input(net, images, size):
    """The teacher's preprocessing written out: resize, then the timm model's own mean/std."""
    cfg = net.pretrained_cfg
    x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def timm_features(out, grid):
    """Global and dense from timm's forward_features: class token + the last h*w tokens, or a map."""
    if out.dim() == 4:
        return out.mean((2, 3)), out
    h, w = grid
    return out[:, 0], out[:, -h * w:].reshape(out.shape[0], h, w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("case", SMALL)
def test_family_loads_a_local_file_exactly(tmp_path, case):
    family, model, size, grid = SMALL[case]
    source = random_timm_file(tmp_path / "w.safetensors", model, img_size=size)
    teacher = build_teacher(TeacherConfig(name="t", family=family, model=model, input_size=size,
                                          weights=str(tmp_path / "w.safetensors"))).freeze()
    images = torch.rand(2, 3, 50, 90)  # any size: the teacher resizes
    with torch.no_grad():
        f = teacher(images)
        g, d = timm_features(source.forward_features(timm_input(source, images, size)), grid)
    torch.testing.assert_close(f.global_, g, rtol=0, atol=0)
    torch.testing.assert_close(f.dense, d, rtol=0, atol=0)
    spec, cfg = teacher.spec, source.pretrained_cfg
    width = source.num_features
    assert (spec.family, spec.input_size, spec.grid, spec.global_dim, spec.dense_dim) == (family, size, grid, width, width)
    assert spec.mean == tuple(cfg["mean"]) and spec.std == tuple(cfg["std"])
    assert spec.mean == ((0.48145466, 0.4578275, 0.40821073) if family == "clip" else (0.485, 0.456, 0.406))
    assert can_be_student(family)
    depth = len(source.blocks)
    targets = teacher.lora_targets()
    assert len(targets) == 4 * depth and {t.split(".")[-1] for t in targets} == {"qkv", "proj", "fc1", "fc2"}


@pytest.mark.parametrize("case", ["dinov2_reg4", "sam"])
def test_layer_k_is_the_output_of_block_k(case):
    family, model, size, grid = SMALL[case]
    teacher = build_teacher(TeacherConfig(name="t", family=family, model=model, input_size=size, weights="none",
                                          layer=3)).freeze()
    seen = []
    teacher.net.blocks[3].register_forward_hook(lambda m, i, out: seen.append(out))
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        f = teacher(images)
        teacher.layer = "last"
        last = teacher(images)
    block = seen[0].permute(0, 3, 1, 2) if seen[0].dim() == 4 else timm_features(seen[0], grid)[1]  # SAM: NHWC
    torch.testing.assert_close(f.dense, block, rtol=0, atol=0)
    torch.testing.assert_close(f.global_, last.global_, rtol=0, atol=0)
    assert f.dense.shape[1] == teacher.net.embed_dim and teacher.spec.dense_dim == teacher.net.embed_dim


@pytest.mark.parametrize("family,model,saved,size", [
    ("dinov2", "vit_small_patch14_dinov2", 126, 70),  # 9x9 position table -> 5x5
    ("sam", "samvit_base_patch16", 256, 128),  # 16x16 table and 31-long relative tables -> 8x8, 15
])
def test_file_saved_at_another_size_is_resampled(tmp_path, family, model, saved, size):
    """The oracle resamples at run time: a dynamic-size timm ViT, and samvit itself."""
    path = tmp_path / "w.safetensors"
    source = random_timm_file(path, model, img_size=saved)
    oracle = timm.create_model(model, num_classes=0, img_size=saved, dynamic_img_size=True).eval() \
        if family == "dinov2" else source
    oracle.load_state_dict(source.state_dict())
    teacher = build_teacher(TeacherConfig(name="t", family=family, model=model, weights=str(path), input_size=size)).freeze()
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        f = teacher(images)
        g, d = timm_features(oracle.forward_features(timm_input(oracle, images, size)), (size // 16, size // 16)
                             if family == "sam" else (size // 14, size // 14))
    assert teacher.net.pos_embed.shape != source.pos_embed.shape
    torch.testing.assert_close(f.global_, g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.dense, d, rtol=1e-5, atol=1e-5)


def facebook_dinov2(state):
    """timm's DINOv2-with-registers keys in facebook's layout: a mask token, ``register_tokens``,
    the class token's position inside ``pos_embed`` (timm folds it into ``cls_token``)."""
    pos0 = torch.randn_like(state["cls_token"])
    out = {k: v for k, v in state.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    return {**out, "mask_token": torch.randn(1, state["cls_token"].shape[-1]), "register_tokens": state["reg_token"],
            "cls_token": state["cls_token"] - pos0, "pos_embed": torch.cat([pos0, state["pos_embed"]], 1)}


def facebook_sam(state):
    """samvit keys in segment-anything's layout: the whole SAM, the encoder under image_encoder."""
    out = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in state.items()}
    return {**out, "prompt_encoder.point_embeddings.0.weight": torch.randn(1, 256),
            "mask_decoder.iou_token.weight": torch.randn(1, 256)}


@pytest.mark.parametrize("case,convert", [("dinov2_reg4", facebook_dinov2), ("sam", facebook_sam)])
def test_original_release_layouts_are_converted(tmp_path, case, convert):
    family, model, size, grid = SMALL[case]
    source = random_timm_file(tmp_path / "timm.safetensors", model, img_size=size)
    path = tmp_path / "original.pth"
    torch.save(convert(source.state_dict()), path)
    teacher = build_teacher(TeacherConfig(name="t", family=family, model=model, input_size=size, weights=str(path))).freeze()
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        f = teacher(images)
        g, d = timm_features(source.forward_features(timm_input(source, images, size)), grid)
    torch.testing.assert_close(f.global_, g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.dense, d, rtol=1e-5, atol=1e-5)


class _Opens:
    """Unpickling this would create a file: the loader must refuse before running it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pt_files_load_and_pickled_objects_are_refused(tmp_path):
    family, model, size, grid = SMALL["clip"]
    cfg = dict(name="c", family=family, model=model, input_size=size)
    source = random_timm_file(tmp_path / "w.pt", model, img_size=size)
    teacher = build_teacher(TeacherConfig(weights=str(tmp_path / "w.pt"), **cfg)).freeze()
    for k, v in source.state_dict().items():
        assert torch.equal(teacher.net.state_dict()[k], v), k
    marker = tmp_path / "ran"
    torch.save({**source.state_dict(), "extra": _Opens(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pt: not loadable with weights_only=True"):
        build_teacher(TeacherConfig(weights=str(tmp_path / "evil.pt"), **cfg))
    assert not marker.exists()


def test_hub_offline_fails_fast_with_a_way_out(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached either
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        build_teacher(TeacherConfig(name="dino", family="dinov2", model="vit_small_patch14_dinov2", weights="hub",
                                    input_size=56))
    assert time.perf_counter() - start < 30
    message = str(err.value)
    for part in ("teacher 'dino'", "family 'dinov2'", "'vit_small_patch14_dinov2'",
                 "huggingface.co/timm/vit_small_patch14_dinov2.lvd142m", "weights: /path/to/model.safetensors"):
        assert part in message, (part, message)


@pytest.mark.parametrize("family,model,weights,match", [
    ("clip", "vit_small_patch14_dinov2", "none", r"the clip family takes timm models matching vit_\*_clip_\* \("),
    ("sam", "", "shipped", "no weights ship with the sam family; use 'hub'"),
])
def test_wrong_model_or_shipped_weights_are_refused(family, model, weights, match):
    with pytest.raises(ValueError, match=match):
        build_teacher(TeacherConfig(name="t", family=family, model=model, weights=weights))


def test_lora_adapter_on_a_dinov2_base(tmp_path):
    family, model, size, _ = SMALL["dinov2_reg4"]
    path = tmp_path / "w.safetensors"
    random_timm_file(path, model, img_size=size)
    cfg = TeacherConfig(name="b", family=family, model=model, weights=str(path), input_size=size)
    reference = build_teacher(cfg).freeze()
    student = Student(build_teacher(cfg), StudentConfig(mode="adapter", lora_rank=4))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_()
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 4 * 12 and all("lora_" in n for n in trainable)
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        ref, base, adapted = reference(images), student.base_features(images), student.body(images)
    assert torch.equal(base.global_, ref.global_) and torch.equal(base.dense, ref.dense)
    assert not torch.allclose(adapted.dense, ref.dense)


def test_student_vit_from_the_dinov2_family(tmp_path):
    """student {mode: full, family: dinov2, model, weights} beside a frozen DINOv2 base teacher."""
    base_file, student_file = tmp_path / "base.safetensors", tmp_path / "student.safetensors"
    random_timm_file(base_file, "vit_small_patch14_reg4_dinov2", img_size=56)
    random_timm_file(student_file, "vit_small_patch14_dinov2", img_size=56)
    data = tiny_recipe_dict(tmp_path / "run", student={"mode": "full", "family": "dinov2",
                                                       "model": "vit_small_patch14_dinov2", "weights": str(student_file)})
    data["teachers"] = [{"name": "dino", "family": "dinov2", "model": "vit_small_patch14_reg4_dinov2",
                         "weights": str(base_file), "input_size": 56, "base": True}]
    student, teachers = build_student_and_teachers(recipe_from_dict(data))
    body, base = student.body, teachers["dino"]
    assert (body.spec.family, body.spec.extra["model"], body.spec.grid) == ("dinov2", "vit_small_patch14_dinov2", (4, 4))
    for want, net in ((load_file(str(student_file)), body.net), (load_file(str(base_file)), base.net)):
        got = net.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert all(p.requires_grad for p in student.parameters())
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        assert student(torch.rand(1, 3, 64, 64)).dense.shape == (1, 384, 4, 4)


GC_STUDENTS = {  # backbone, its first block (which starts twice under checkpointing), weights off the feature path
    "vit": (dict(family="dinov2", model="vit_small_patch14_dinov2", input_size=56, weights="none"), "net.blocks.0", ()),
    "mobilenet_v2": (dict(family="mobilenet_v2", input_size=64), "net.features.1", ("backbone.net.classifier.",)),
}


@pytest.mark.parametrize("case", GC_STUDENTS)
def test_gradient_checkpointing_gives_the_same_loss_gradients_and_statistics(case):
    cfg, first_block, unused = GC_STUDENTS[case]
    backbone = build_teacher(TeacherConfig(name="b", **cfg))
    images = torch.rand(3, 3, 64, 64)
    runs = {}
    for on in (False, True):
        student = Student(copy.deepcopy(backbone), StudentConfig(mode="full", grad_checkpointing=on)).train()
        calls = []
        student.get_submodule("backbone." + first_block).register_forward_pre_hook(lambda *_: calls.append(1))
        f = student(images)
        gen = torch.Generator().manual_seed(0)
        loss = (f.global_ * torch.randn(f.global_.shape, generator=gen)).mean() \
            + (f.dense * torch.randn(f.dense.shape, generator=gen)).square().mean()
        loss.backward()
        grads = {n: p.grad for n, p in student.named_parameters()}
        runs[on] = loss.detach(), grads, len(calls), {n: b.clone() for n, b in student.named_buffers()}
    (loss_off, grads_off, calls_off, bufs_off), (loss_on, grads_on, calls_on, bufs_on) = runs[False], runs[True]
    assert (calls_off, calls_on) == (1, 2)  # checkpointing really recomputed the block
    for name, b in bufs_off.items():  # batch-norm statistics move once per step, not once more in backward
        assert torch.equal(bufs_on[name], b), name
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=0)
    for name, g in grads_off.items():
        if name.startswith(unused):
            assert g is None and grads_on[name] is None, name
        else:
            torch.testing.assert_close(grads_on[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("family,model,saved_size,grid,width", [
    ("dinov2", "vit_large_patch14_dinov2.lvd142m", 518, (16, 16), 1024),  # hub checkpoints are 518 px
    ("clip", "vit_large_patch14_clip_224.openai", 224, (16, 16), 1024),
    ("sam", "samvit_base_patch16.sa1b", 1024, (32, 32), 256),  # SAM's native size, read at 512
])
def test_default_large_teachers(tmp_path, family, model, saved_size, grid, width):
    """``model: ""`` and ``input_size: 0`` give the family's defaults: DINOv2-L/14 and CLIP-L/14 at
    224, SAM-B at 512, from random weights saved at the size their real checkpoints have."""
    path = tmp_path / "w.safetensors"
    random_timm_file(path, model, img_size=saved_size)
    teacher = build_teacher(TeacherConfig(name="t", family=family, weights=str(path))).freeze()
    spec = teacher.spec
    assert spec.extra["model"] == model
    assert (spec.input_size, spec.grid, spec.global_dim, spec.dense_dim) == (grid[0] * (14 if family != "sam" else 16),
                                                                            grid, width, width)
