"""Training engines behind one interface (``engines.base.Engine``); ``build_engine`` picks one."""
from __future__ import annotations

import torch

from ...schema import Recipe
from ...engine_config import resolve_engine_name
from ..distributed import DistEnv
from .base import ENGINES, Engine
from . import deepspeed_engine, torch_engine  # noqa: F401  (registration)


def build_engine(recipe: Recipe, model: torch.nn.Module, device: torch.device, dist: DistEnv, bf16: bool) -> Engine:
    return ENGINES.get(resolve_engine_name(recipe, device.type))(recipe, model, device, dist, bf16)


__all__ = ["ENGINES", "Engine", "build_engine"]
