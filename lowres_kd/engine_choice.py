"""Which training engine a recipe gets: one rule shared by the trainer and the planner."""
from __future__ import annotations

import importlib.util


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def resolve_engine_name(recipe, device_type: str) -> str:
    """``engine: auto`` is DeepSpeed on CUDA when it is installed, else the plain torch engine
    (DeepSpeed runs on CPU too, but compiles its ops on first use: ask for it by name)."""
    if recipe.engine != "auto":
        return recipe.engine
    return "deepspeed" if device_type == "cuda" and deepspeed_installed() else "torch"
