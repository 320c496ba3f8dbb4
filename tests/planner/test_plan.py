"""What the planner picks: nothing when the recipe fits, the documented order otherwise, a clear
error when nothing fits; ``plan.apply`` gives a valid recipe."""
import importlib.util

import pytest

from lowres_kd.config import RecipeError
from lowres_kd.planner import apply_changes, plan_recipe

HUGE = 2**40
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


def total(recipe, device_type="cpu", world_size=1) -> int:
    plan = plan_recipe(recipe, HUGE, world_size=world_size, device_type=device_type)
    assert plan.fits and not plan.changes
    return plan.estimate.device_total


@pytest.fixture
def recipe(tiny_recipe):
    return tiny_recipe(plan={"reserve": 0.0})


def test_a_recipe_that_fits_is_left_as_it_is(recipe):
    plan = plan_recipe(recipe, HUGE, device_type="cpu")
    assert plan.fits and plan.changes == {} and not plan.error
    assert plan.apply(recipe).to_dict() == recipe.to_dict()
    assert plan.estimate.device_total == plan.original.device_total
    names = [c.name for c in plan.estimate.components]
    for row in ("teacher weights: effnet", "student activations", "optimizer state", "loss buffers", "normalisers"):
        assert row in names


@needs_bnb
def test_changes_come_in_the_documented_order(recipe):
    as_written = total(recipe)
    with_ckpt = total(apply_changes(recipe, {"student.grad_checkpointing": True}))
    ckpt_and_int8 = total(apply_changes(recipe, {"student.grad_checkpointing": True, "teachers.1.bits": 8}))
    assert ckpt_and_int8 < with_ckpt < as_written

    # just under the recipe: checkpointing (step 2) comes before quantizing (step 3)
    plan = plan_recipe(recipe, with_ckpt, device_type="cpu")
    assert plan.fits and plan.changes == {"student.grad_checkpointing": True}

    # below that: the largest teacher first (HED has no Linear: int8 saves nothing there and is
    # skipped), then EfficientNet-Lite0, whose classifier Linear goes to int8
    plan = plan_recipe(recipe, ckpt_and_int8, device_type="cpu")
    assert plan.fits and plan.changes == {"student.grad_checkpointing": True, "teachers.1.bits": 8}
    assert [label for label, _ in plan.trail][:3] == ["as written", "gradient checkpointing", "teacher effnet to 8 bits"]

    new = plan.apply(recipe)
    assert new.student.grad_checkpointing and new.teachers[1].bits == 8 and new.teachers[2].bits == 16
    assert plan.estimate.device_total <= ckpt_and_int8


def test_smaller_micro_batch_keeps_the_effective_batch(tiny_recipe):
    recipe = tiny_recipe(plan={"reserve": 0.0}, train={"batch_size": 16, "grad_accum": 1, "steps": 4})
    at_8 = total(apply_changes(recipe, {"train.batch_size": 8, "train.grad_accum": 2}))
    plan = plan_recipe(recipe, at_8, device_type="cpu")
    assert plan.fits and plan.changes == {"train.batch_size": 8, "train.grad_accum": 2}
    t = plan.apply(recipe).train
    assert t.batch_size * t.grad_accum == 16


@needs_bnb
def test_the_micro_batch_grows_back_once_a_later_change_fits(tiny_recipe):
    """Halving the micro-batch and checkpointing do not reach the budget, a ViT-B teacher in int8
    does: the plan then undoes checkpointing and grows the micro-batch back to the recipe's."""
    vit = {"name": "vit", "family": "timm", "model": "vit_base_patch16_224", "weights": "none", "input_size": 64}
    recipe = tiny_recipe(plan={"reserve": 0.0}, train={"batch_size": 16, "grad_accum": 1, "steps": 4},
                         teachers=[{"name": "mobilenet", "family": "mobilenet_v2", "input_size": 64, "base": True}, vit])
    budget = total(apply_changes(recipe, {"teachers.1.bits": 8}))
    assert budget < total(apply_changes(recipe, {"train.batch_size": 1, "train.grad_accum": 16,
                                                 "student.grad_checkpointing": True}))
    plan = plan_recipe(recipe, budget, device_type="cpu")
    assert plan.fits and plan.changes == {"teachers.1.bits": 8}
    labels = [label for label, _ in plan.trail]
    assert labels[:5] == ["as written", "micro-batch 8 x 2", "micro-batch 4 x 4", "gradient checkpointing",
                          "teacher vit to 8 bits"]
    assert "without gradient checkpointing" in labels and labels[-1] == "micro-batch back to 16 x 1"


def test_nothing_fits_names_the_biggest_components(recipe):
    plan = plan_recipe(recipe, 10 * 2**20, device_type="cpu")
    assert not plan.fits
    assert "nothing fits" in plan.error
    biggest = plan.estimate.largest(3)
    for c in biggest:
        assert c.name in plan.error
    assert biggest[0].name == "normalisers"  # 52 MiB of fp32 transforms and their inverses
    assert "DOES NOT FIT" in plan.table() and plan.error in plan.table()


def test_deepspeed_partitions_over_ranks(tiny_recipe):
    """Four ranks, DeepSpeed ZeRO 0, a budget only partitioning reaches: ZeRO comes in."""
    pytest.importorskip("deepspeed")
    recipe = tiny_recipe(plan={"reserve": 0.0}, engine="deepspeed", deepspeed={"zero_stage": 0},
                         student={"mode": "full"})
    everything = {"student.grad_checkpointing": True, "teachers.1.offload": True, "teachers.2.offload": True,
                  "deepspeed.zero_stage": 1}
    budget = total(apply_changes(recipe, everything), device_type="cuda", world_size=4)
    assert budget < total(apply_changes(recipe, {**everything, "deepspeed.zero_stage": 0}), "cuda", 4)
    plan = plan_recipe(recipe, budget, world_size=4, device_type="cuda")
    assert plan.fits and plan.engine == "deepspeed"
    assert plan.changes.get("deepspeed.zero_stage", 0) >= 1
    state = {c.name: c.device for c in plan.estimate.components}
    # per rank: fp32 master + moments, 12 bytes / 4; bf16 parameters, 2 bytes (/ 4 at stage 3)
    stage = plan.estimate.settings["deepspeed"]["zero_stage"]
    params = state["student trainable params"] + state["heads params"]
    assert state["optimizer state"] / params == pytest.approx(1.5 if stage < 3 else 6, rel=1e-3)


def test_apply_validates(recipe):
    with pytest.raises(RecipeError):
        apply_changes(recipe, {"teachers.0.offload": True})  # the adapter-mode base is the student: refused
