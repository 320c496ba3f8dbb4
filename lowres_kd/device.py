"""Where a run computes and how much memory it may use: shared by training, probing and planning."""
from __future__ import annotations

import os
import resource

import torch

from .schema import Recipe
from .units import parse_bytes


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``train.device``; on CUDA each process of a multi-GPU run takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but CUDA is not available (use auto or cpu)")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def memory_budget(recipe: Recipe, device: torch.device) -> int:
    """``plan.gpu_mem``, else the device's memory (CPU: the machine's RAM)."""
    if recipe.plan.gpu_mem:
        return parse_bytes(recipe.plan.gpu_mem)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated memory on CUDA; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
