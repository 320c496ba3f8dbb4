"""Quantized and offloaded teachers inside a real run: bytes and fidelity reported, threshold enforced."""
import json

import pytest
import torch

from skimage import data as skdata

from helpers import tiny_recipe_dict
from lowres_kd.config import TeacherConfig, recipe_from_dict
from lowres_kd.data import EvalTransform
from lowres_kd.lowmem import FidelityError
from lowres_kd.targets import run_teacher
from lowres_kd.teachers import build_teacher
from lowres_kd.training.trainer import Trainer

VIT = {"name": "vit", "family": "timm", "model": "vit_tiny_patch16_224", "input_size": 64}


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    from safetensors.torch import save_file
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "vit_tiny.safetensors"
    net = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def teachers(vit_weights, **vit):
    return [{"name": "mobilenet", "family": "mobilenet_v2", "input_size": 64, "base": True},
            {**VIT, "weights": vit_weights, **vit}]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_offloaded_teacher_trains_and_reports(tmp_path, vit_weights, bits):
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path / "run", teachers=teachers(vit_weights, bits=bits, offload=True,
                                                                                     min_fidelity=0.8),
                                               train={"steps": 2, "checkpoint_every": 100}))
    trainer = Trainer(recipe, progress=False).setup()
    report = json.loads((recipe.run_dir / "teachers.json").read_text())["vit"]
    assert f"{bits}-bit" in report["quantization"]
    assert report["fidelity_normalised"]["cos_min"] >= 0.8 and report["fidelity_raw"]["images"] == 8
    assert torch.isfinite(torch.tensor(trainer.train()["loss"]))


def test_fidelity_below_threshold_stops_before_training(tmp_path, vit_weights):
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path / "run", teachers=teachers(vit_weights, bits=4, min_fidelity=0.99999)))
    with pytest.raises(FidelityError, match=r"teacher 'vit' at 4 bits: .* below min_fidelity=0.99999; try bits=8"):
        Trainer(recipe, progress=False).setup()
    assert not (recipe.run_dir / "checkpoints").exists()


@pytest.mark.parametrize("family", ["mobilenet_v2", "hed", "efficientnet_lite0"])
def test_bf16_teachers_under_autocast_match_fp32(family):
    """What the trainer does to unquantized teachers on CUDA (train.bf16), here with CPU autocast,
    on real photos."""
    teacher = build_teacher(TeacherConfig(name="t", family=family, input_size=64)).freeze()
    images = torch.cat([EvalTransform(64)(getattr(skdata, name)())[None] for name in ("chelsea", "coffee")])
    with torch.no_grad():
        reference = run_teacher(teacher, images, None)
        teacher.to(torch.bfloat16)
        got = run_teacher(teacher, images, torch.bfloat16)
    assert next(teacher.parameters()).dtype == torch.bfloat16
    for a, b in zip(got, reference):
        cos = torch.nn.functional.cosine_similarity(a.float().flatten(1), b.flatten(1)).min()
        assert cos > 0.99, (family, float(cos))
