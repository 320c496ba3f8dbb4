"""Knowledge preservation: the adapter-disabled student is the base teacher, bit for bit."""
import pytest
import torch

from lowres_kd.config import StudentConfig, TeacherConfig
from lowres_kd.model import Student
from lowres_kd.teachers import build_teacher

BASES = {
    "mobilenet_v2": dict(family="mobilenet_v2", input_size=64),  # real shipped weights
    "timm": dict(family="timm", model="vit_tiny_patch16_224", input_size=64, weights="none"),
}


@pytest.mark.parametrize("base", BASES)
def test_adapter_disabled_equals_base_teacher(base):
    cfg = TeacherConfig(name="b", **BASES[base])
    torch.manual_seed(0)
    reference = build_teacher(cfg).freeze()
    torch.manual_seed(0)
    student = Student(build_teacher(cfg), StudentConfig(mode="adapter", lora_rank=4))
    # make the adapter do something, as after training
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_()
    student.train()  # batch norm of the frozen base must still use its running statistics
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        ref = reference(x)
        base_feats = student.base_features(x)
        adapted = student.body(x)
    assert torch.equal(base_feats.global_, ref.global_) and torch.equal(base_feats.dense, ref.dense)
    assert not torch.allclose(adapted.global_, ref.global_)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_student_dense_tap_is_finer_than_the_teacher_map():
    student = Student(build_teacher(TeacherConfig(name="b", family="mobilenet_v2", input_size=128)), StudentConfig())
    with torch.no_grad():
        f = student(torch.rand(1, 3, 128, 128))
    assert f.dense.shape[-2:] == (16, 16)  # stride 8, where the teacher's own map is 4x4
    assert student.body.spec.grid == (4, 4)


@pytest.mark.parametrize("mode", ["full", "scratch"])
def test_full_and_scratch_train_every_weight(mode):
    student = Student(build_teacher(TeacherConfig(name="b", family="mobilenet_v2", input_size=64,
                                                  weights="none")), StudentConfig(mode=mode))
    assert all(p.requires_grad for p in student.parameters())
    with pytest.raises(RuntimeError, match="adapter"):
        student.base_features(torch.rand(1, 3, 64, 64))
