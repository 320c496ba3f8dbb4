"""The 8 / 12 / 24 GB recipes: they validate, fit their budget by the planner's estimate with the
settings as written, say in their comments what the planner says, and build with local weights."""
import re
import shutil
from pathlib import Path

import pytest
import torch

from lowres_kd.config import load_recipe
from lowres_kd.planner import plan_recipe
from lowres_kd.units import parse_bytes

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("vitb_dinov2_clip_sam_*gb.yaml"))
QLORA = REPO / "recipes" / "vitl_dinov2_4bit_lora_clip_sam_8gb.yaml"
EXPECTED = re.compile(r"GPU peak ([0-9.]+) GiB .* CPU memory ([0-9.]+) GiB.*about ([0-9]+) images/s", re.S)


def test_three_budgets_exist():
    assert [p.name for p in RECIPES] == [f"vitb_dinov2_clip_sam_{gb}gb.yaml" for gb in (12, 24, 8)]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_fits_its_budget_as_written_and_says_so(path):
    recipe = load_recipe(path)
    budget = parse_bytes(recipe.plan.gpu_mem)
    assert recipe.plan.gpu_mem.rstrip("GB") in path.stem
    plan = plan_recipe(recipe, budget, world_size=1, device_type="cuda")
    assert plan.fits and plan.changes == {}, plan.table()
    assert plan.device_total_bytes <= budget
    # the students and teachers the issue asks for
    assert recipe.student.mode == "full" and recipe.student.model.startswith("vit_base_patch14_dinov2")
    assert [(t.family, t.base) for t in recipe.teachers] == [("dinov2", True), ("clip", False), ("sam", False)]
    assert_quotes_the_planner(path, plan)


def assert_quotes_the_planner(path, plan):
    """The comment at the top quotes the planner (regenerate it when the planner changes)."""
    found = EXPECTED.search(path.read_text())
    assert found, "the recipe's comment must quote the planner's GPU peak, CPU memory and images/s"
    gpu, cpu, ips = float(found.group(1)), float(found.group(2)), int(found.group(3))
    assert gpu == pytest.approx(plan.device_total_bytes / 2**30, abs=0.02)
    assert cpu == pytest.approx(plan.cpu_total_bytes / 2**30, abs=0.02)
    assert ips == pytest.approx(plan.images_per_s, abs=1.0)


def test_the_4bit_adapter_recipe_fits_8gb_with_the_base_counted_at_4_bits():
    recipe = load_recipe(QLORA)
    assert recipe.student.mode == "adapter" and recipe.student_base_bits == 4
    assert [(t.family, t.base, t.bits) for t in recipe.teachers] == [("dinov2", True, 4), ("clip", False, 8),
                                                                      ("sam", False, 8)]
    assert recipe.teachers[0].model.startswith("vit_large_patch14_dinov2")
    plan = plan_recipe(recipe, parse_bytes("8GB"), world_size=1, device_type="cuda")
    assert plan.fits and plan.changes == {} and plan.engine == "torch", plan.table()
    frozen = {c.name: c.device for c in plan.estimate.components}["student frozen weights"]
    assert 0.12 * 2**30 < frozen < 0.2 * 2**30  # 304M weights in nf4, not 1.13 GiB of fp32
    assert_quotes_the_planner(QLORA, plan)


def test_smaller_budgets_trade_speed_for_memory():
    recipes = {gb: load_recipe(REPO / "recipes" / f"vitb_dinov2_clip_sam_{gb}gb.yaml") for gb in (8, 12, 24)}
    assert recipes[24].student.grad_checkpointing is False and recipes[8].student.grad_checkpointing is True
    assert recipes[24].teachers[0].bits == 16 and recipes[12].teachers[0].bits == 8
    assert recipes[8].teachers[0].offload and recipes[8].deepspeed.offload_optimizer == "cpu"
    effective = {gb: r.train.batch_size * r.train.grad_accum for gb, r in recipes.items()}
    assert len(set(effective.values())) == 1, effective  # the same optimisation problem on every card


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """DINOv2-L, CLIP-L, SAM-B and the DINOv2 ViT-B student as local random-weight files, the way an
    offline user names downloaded checkpoints; and the student's state to compare with."""
    import timm
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    files, student_state = {}, None
    for key, model, kwargs in (("dinov2", "vit_large_patch14_dinov2", {"img_size": 224}),
                               ("clip", "vit_large_patch14_clip_224", {}),
                               ("sam", "samvit_base_patch16", {"img_size": 512}),
                               ("student", "vit_base_patch14_dinov2", {"img_size": 224})):
        net = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
        files[key] = folder / f"{key}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(files[key]))
        if key == "student":
            student_state = net.state_dict()
        del net
    yield files, student_state
    shutil.rmtree(folder, ignore_errors=True)  # 3.4 GB: not left for pytest's retention


def local_weights(files):
    return ([f"teachers.{i}.weights={files[k]}" for i, k in enumerate(("dinov2", "clip", "sam"))]
            + [f"student.weights={files['student']}"])


@pytest.mark.slow
def test_twelve_gb_recipe_builds_from_local_random_weights(tmp_path, weight_files):
    from lowres_kd.build import build_student_and_teachers

    files, student_state = weight_files
    recipe = load_recipe(REPO / "recipes" / "vitb_dinov2_clip_sam_12gb.yaml",
                         local_weights(files) + [f"output_dir={tmp_path}/run"])
    student, teachers = build_student_and_teachers(recipe)
    assert set(teachers) == {"dinov2", "clip", "sam"}  # full mode: the base stays a frozen teacher
    specs = {n: (t.spec.grid, t.spec.global_dim, t.spec.dense_dim) for n, t in teachers.items()}
    assert specs == {"dinov2": ((16, 16), 1024, 1024), "clip": ((16, 16), 1024, 1024), "sam": ((32, 32), 256, 256)}
    body = student.body.net
    assert sum(p.numel() for p in body.parameters()) == pytest.approx(85.7e6, rel=0.005)  # a ViT-B/14 without its classifier
    for k, v in student_state.items():
        assert torch.equal(body.state_dict()[k], v), k
    assert all(not p.requires_grad for t in teachers.values() for p in t.parameters())


@pytest.mark.slow
def test_eight_gb_recipe_trains_a_step_on_cpu(tmp_path, weight_files):
    """The 8 GB recipe as written (int8 + offloaded teachers, checkpointing), one tiny step on CPU:
    about 90 s and 7 GiB of RAM on 2 cores. Random weights: fidelity floors off."""
    import json

    from lowres_kd.training.trainer import Trainer

    files, _ = weight_files
    tiny = ["train.steps=1", "train.batch_size=1", "train.grad_accum=1", "space.calibration_images=2",
            "data.fashion_mnist=0", "data.num_workers=0", f"output_dir={tmp_path}/run"]
    tiny += [f"teachers.{i}.min_fidelity=0" for i in range(3)]
    recipe = load_recipe(REPO / "recipes" / "vitb_dinov2_clip_sam_8gb.yaml", local_weights(files) + tiny)
    trainer = Trainer(recipe, progress=False).setup()
    last = trainer.train()
    assert torch.isfinite(torch.tensor(last["loss"])) and last["grad_norm"] > 0
    assert all(f"{t}/dense" in last for t in ("dinov2", "clip", "sam"))
    report = json.loads((tmp_path / "run" / "teachers.json").read_text())
    for name in ("dinov2", "clip", "sam"):  # every teacher int8, checked against full precision
        assert "8-bit" in report[name]["quantization"] and report[name]["fidelity_raw"]["cos_min"] > 0.99
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_4bit_adapter_recipe_trains_a_step_on_cpu(tmp_path, weight_files):
    """The DINOv2-L base in nf4 under LoRA, CLIP-L and SAM-B in int8, one tiny step on CPU from
    local random-weight files. Random weights: fidelity floors off."""
    import json

    from lowres_kd.lowmem.tensors import bnb_kind
    from lowres_kd.training.trainer import Trainer

    files, _ = weight_files
    tiny = ["train.steps=1", "train.batch_size=1", "train.grad_accum=1", "space.calibration_images=2",
            "data.fashion_mnist=0", "data.num_workers=0", f"output_dir={tmp_path}/run"]
    tiny += [f"teachers.{i}.min_fidelity=0" for i in range(3)]
    tiny += [f"teachers.{i}.weights={files[k]}" for i, k in enumerate(("dinov2", "clip", "sam"))]
    trainer = Trainer(load_recipe(QLORA, tiny), progress=False).setup()
    last = trainer.train()
    assert torch.isfinite(torch.tensor(last["loss"])) and last["grad_norm"] > 0
    student = trainer.model.student
    kinds = [bnb_kind(m) for m in student.body.modules() if bnb_kind(m) is not None]
    assert len(kinds) == 4 * 24 and set(kinds) == {"nf4"}  # qkv, proj, fc1, fc2 of 24 blocks
    assert all("lora_" in n for n, p in student.named_parameters() if p.requires_grad)
    report = json.loads((tmp_path / "run" / "teachers.json").read_text())
    assert report["dinov2"]["quantization"].startswith("4-bit") and "fidelity_raw" in report["dinov2"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
