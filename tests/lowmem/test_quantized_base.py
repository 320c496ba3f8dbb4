"""A base quantized under the LoRA adapter (QLoRA-style), on the shipped DINOv2 ViT-S/14 at 8 and 4
bits: the adapter trains while the base stays frozen and quantized, a resume is exact, the run
reloads and exports fp32 weights with the LoRA delta added, and the planner counts the base at its
bits. Refusals: offloading the base, DeepSpeed under it."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import logged_losses, tiny_recipe_dict
from lowres_kd import load
from lowres_kd.build import build_student
from lowres_kd.config import RecipeError, recipe_from_dict
from lowres_kd.engine_config import resolve_engine_name
from lowres_kd.export import export_backbone
from lowres_kd.lowmem import tensor_bytes
from lowres_kd.lowmem.bnb_state import dequantized_weight
from lowres_kd.lowmem.tensors import bnb_kind
from lowres_kd.planner import plan_recipe
from lowres_kd.rundir import checkpoint as ckpt
from lowres_kd.training.trainer import Trainer

KIND = {8: "int8", 4: "nf4"}


def qlora_dict(run_dir, bits, **train):
    """The tiny recipe with the shipped ViT-S/14 at 56 px (a 4 x 4 grid) as the quantized base and HED.
    The fidelity floor is 0.9: 16 calibration images fit this tiny recipe's normalisers poorly, and
    nf4 on a ViT-S at 56 px costs 0.93-0.95 normalised cosine there (0.97 raw; 0.99 raw at 224 px)."""
    data = tiny_recipe_dict(run_dir)
    data["teachers"] = [{"name": "dino", "family": "dinov2", "input_size": 56, "base": True, "bits": bits,
                         "min_fidelity": 0.9},
                        {"name": "edges", "family": "hed", "input_size": 64}]
    data["student"] = {"mode": "adapter", "lora_rank": 4}
    data["train"] = {**data["train"], **train}
    return data


def quantized_layers(student):
    return {n: m for n, m in student.body.named_modules() if bnb_kind(m) is not None}


@pytest.fixture(scope="module", params=[8, 4], ids=["int8", "nf4"])
def trained(request, tmp_path_factory):
    """A 4-step run, and the base's quantized weights as built before any step."""
    bits = request.param
    run = tmp_path_factory.mktemp(f"qlora{bits}") / "run"
    recipe = recipe_from_dict(qlora_dict(run, bits))
    trainer = Trainer(recipe, progress=False).setup()
    before = {n: dequantized_weight(m).clone() for n, m in quantized_layers(trainer.model.student).items()}
    trainer.train()
    return bits, trainer, before


def test_the_adapter_trains_on_a_frozen_quantized_base(trained):
    bits, trainer, before = trained
    student = trainer.model.student
    layers = quantized_layers(student)
    assert len(layers) == 48 and {bnb_kind(m) for m in layers.values()} == {KIND[bits]}
    wrapped = {n for n, m in student.body.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {n.removesuffix(".base_layer") for n in layers}  # every quantized linear carries LoRA
    for name, layer in layers.items():  # still quantized, and not one weight moved
        assert not any(p.requires_grad for p in layer.parameters())
        assert torch.equal(dequantized_weight(layer), before[name]), name
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 48 and all("lora_" in n for n in trainable)
    assert all(float(p.detach().abs().max()) > 0 for n, p in trainable.items() if "lora_B" in n)  # B starts at zero

    images = torch.rand(2, 3, 64, 64)
    trainer.model.train()
    in_training = student.base_features(images)  # targets do not depend on the mode (bitsandbytes' do)
    assert student.training
    trainer.model.eval()
    in_eval = student.base_features(images)
    assert torch.equal(in_training.global_, in_eval.global_) and torch.equal(in_training.dense, in_eval.dense)
    trainer.model.train()
    loss, _ = trainer._loss_step(images)
    loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in trainable.values())
    assert all(p.grad is None for n, p in student.named_parameters() if n not in trainable)
    trainer.model.zero_grad(set_to_none=True)

    report = json.loads((trainer.run_dir / "teachers.json").read_text())["dino"]
    assert report["quantization"].startswith(f"{bits}-bit")
    assert report["fidelity_raw"]["cos_min"] > (0.999 if bits == 8 else 0.95), report  # vs the fp32 base
    assert report["fidelity_normalised"]["cos_min"] >= 0.9
    assert student.quantization.ratio < (0.27 if bits == 8 else 0.15)  # of the fp32 base
    lora_bytes = 4 * sum(p.numel() for p in trainable.values())
    assert tensor_bytes(student.body) - lora_bytes == student.quantization.bytes_after  # nothing grew in training


def test_a_resume_onto_the_quantized_base_is_exact(trained, tmp_path):
    bits, trainer, _ = trained
    expected = logged_losses(trainer.run_dir)
    broken = qlora_dict(tmp_path / "run", bits)
    first = Trainer(recipe_from_dict(broken), progress=False).setup()
    first.recipe.train.steps = 2  # stop after the first checkpoint, as a crash would
    first.train()
    assert [p.name for p in ckpt.step_checkpoints(tmp_path / "run")] == ["step_0000002"]
    Trainer(recipe_from_dict(broken), resume=True, progress=False).setup().train()
    assert logged_losses(tmp_path / "run") == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_the_run_reloads_and_exports_fp32_weights_with_the_delta(trained, tmp_path):
    bits, trainer, _ = trained
    model = load(trainer.run_dir)
    assert {bnb_kind(m) for m in quantized_layers(model.student).values()} == {KIND[bits]}
    images = torch.rand(3, 3, 64, 64)
    trainer.model.eval()
    with torch.no_grad():
        want, got = trainer.model(images), model(images)
    assert torch.equal(want["global"], got["global"]) and torch.equal(want["dense"], got["dense"])

    out = export_backbone(trainer.run_dir, tmp_path / "backbone.safetensors")
    state = load_file(str(out))
    qkv = model.student.body.net.blocks[3].attn.qkv
    a, b = qkv.lora_A["default"].weight.double(), qkv.lora_B["default"].weight.double()
    merged = dequantized_weight(qkv.base_layer).double() + qkv.scaling["default"] * (b @ a)
    assert state["blocks.3.attn.qkv.weight"].dtype == torch.float32
    assert torch.allclose(state["blocks.3.attn.qkv.weight"].double(), merged, atol=1e-6)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56)
    net.load_state_dict(state)  # the plain family network, no bitsandbytes
    with torch.no_grad():
        tokens = net.eval().forward_features(model.student.body.preprocess(images, 56))
    # the quantized layers compute in int8 / bf16, the export in fp32
    assert F.cosine_similarity(tokens[:, 0], got["global"]).min() > (0.999 if bits == 8 else 0.995)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_the_planner_counts_the_base_at_its_bits(tmp_path, bits):
    """Against the bytes of the student as built (the torch engine: fp32 outside the quantized linears)."""
    recipe = recipe_from_dict(qlora_dict(tmp_path / "run", bits))
    assert plan_recipe(recipe, 16 * 2**30, device_type="cuda").engine == ("deepspeed" if bits == 16 else "torch")
    plan = plan_recipe(recipe, 16 * 2**30, device_type="cpu")
    frozen = {c.name: c for c in plan.estimate.components}["student frozen weights"]
    student = build_student(recipe)
    real = sum(tensor_bytes(m) for m in student.body.modules() if bnb_kind(m) is not None)
    real += sum(4 * p.numel() for m in student.body.modules() if bnb_kind(m) is None
                for p in m.parameters(recurse=False) if not p.requires_grad)
    real += sum(b.numel() * b.element_size() for b in student.body.buffers())
    assert frozen.device == pytest.approx(real, rel=0.01), (frozen, real)
    assert not any(k.startswith("teachers.0.") for k in plan_recipe(recipe, 2**20, device_type="cpu").changes)


def test_offload_and_deepspeed_under_a_quantized_base_are_refused(tmp_path):
    data = qlora_dict(tmp_path / "run", 4)
    data["teachers"][0]["offload"] = True
    with pytest.raises(RecipeError, match=r"teachers\[0\].offload: True is not allowed; false for the base teacher "
                                          r"in adapter mode: .* lower its bits to 8 or 4 instead"):
        recipe_from_dict(data)
    data = qlora_dict(tmp_path / "run", 4)
    data["engine"] = "deepspeed"
    with pytest.raises(RecipeError, match=r"engine: 'deepspeed' is not allowed; torch or auto with a quantized base "
                                          r"in adapter mode \(teachers\[0\].bits=4\): DeepSpeed casts"):
        recipe_from_dict(data)
    data["engine"] = "auto"
    assert resolve_engine_name(recipe_from_dict(data), "cuda") == "torch"


def test_a_base_below_its_fidelity_floor_names_the_next_bits(tmp_path):
    data = qlora_dict(tmp_path / "run", 4)
    data["teachers"][0]["min_fidelity"] = 0.999
    with pytest.raises(Exception, match=r"teacher 'dino' at 4 bits: feature cosine .* below min_fidelity=0.999; "
                                        r"try bits=8 for this teacher"):
        Trainer(recipe_from_dict(data), progress=False).setup()


@pytest.mark.parametrize("bits", [8, 4])
def test_a_full_precision_state_does_not_load_into_a_quantized_base(tmp_path, bits):
    """A state dict of another precision has the same keys and shapes an int8 layer has: refused by name."""
    plain = build_student(recipe_from_dict(qlora_dict(tmp_path / "run", 16))).state_dict()
    quantized = build_student(recipe_from_dict(qlora_dict(tmp_path / "run", bits)))
    with pytest.raises(RuntimeError, match=r"net.blocks.0.attn.qkv.base_layer.weight: the saved layer (is not int8 "
                                           r"with row scales|has no nf4 quantization state)"):
        quantized.load_state_dict(plain)
