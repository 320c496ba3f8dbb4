"""The memory planner (DESIGN §3): ``lowres-kd plan RECIPE --gpu-mem 12GiB``, and ``memory: auto``.

    from lowres_kd.planner import plan_recipe
    plan = plan_recipe(recipe, gpu_mem_bytes, world_size=1, device_type="cuda")
    plan.fits, plan.changes, plan.apply(recipe), plan.table(), plan.as_dict()

``profile`` measures the recipe's models on the meta device (``memtrack`` counts live bytes and
emulates the device's attention and autocast there), ``arithmetic`` holds the byte formulas
(quantized weights, engine state), ``plan`` estimates each component and chooses the settings.
"""
from .plan import Component, Estimate, Plan, apply_changes, estimate, plan_recipe
from .profile import PlanError, RecipeProfile, profile_recipe

__all__ = ["Component", "Estimate", "Plan", "PlanError", "RecipeProfile", "apply_changes", "estimate", "plan_recipe",
           "profile_recipe"]
