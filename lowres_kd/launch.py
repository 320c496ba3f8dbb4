"""Starting work on a recipe: ``memory: auto`` resolved by the planner for this process's device,
then the trainer or the cache build. What ``lowres-kd train`` and ``lowres-kd cache`` call; the
trainer and the planner know nothing of each other."""
from __future__ import annotations

from typing import Optional

from .cache import build_cache
from .device import memory_budget, resolve_device
from .planner import Plan, PlanError, plan_recipe
from .schema import Recipe
from .training.distributed import DistEnv
from .training.trainer import Trainer


def plan_for_device(recipe: Recipe) -> Optional[Plan]:
    """``memory: auto``: the planner's settings for this process's device, budget and world size
    (None for ``memory: manual``); refused when nothing fits."""
    if recipe.memory != "auto":
        return None
    dist = DistEnv.from_env()
    device = resolve_device(recipe.train.device, dist.local_rank)
    plan = plan_recipe(recipe, memory_budget(recipe, device), world_size=dist.world_size, device_type=device.type)
    if not plan.fits:
        raise PlanError("memory: auto found no settings that fit (see the table; `lowres-kd plan RECIPE` shows it "
                        "with what to change):\n" + plan.table())
    return plan


def trainer_for(recipe: Recipe, resume: bool = False, progress: bool = True) -> Trainer:
    """The trainer of ``recipe`` (not yet set up), with the planner's settings under ``memory: auto``."""
    return Trainer(recipe, resume=resume, progress=progress, plan=plan_for_device(recipe))


def cache_for(recipe: Recipe, progress: bool = True) -> dict:
    """``lowres-kd cache``: the teacher cache of ``recipe`` as the planned run would compute it."""
    plan = plan_for_device(recipe)
    return build_cache(plan.apply(recipe) if plan is not None else recipe, progress=progress)
