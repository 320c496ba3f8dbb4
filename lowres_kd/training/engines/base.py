"""What the trainer's single loop asks of an engine: the optimizer side of a training step.

Per optimizer step the loop calls ``set_lr``, then ``backward`` once per micro-batch, then
``step``; ``save``/``load`` add the engine's state to a checkpoint directory. Engines differ in
where gradients and optimizer state live (plain PyTorch; DeepSpeed ZeRO with offload), never in
the loss or the data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ...schema import Recipe
from ...registry import Registry
from ..distributed import DistEnv

ENGINES = Registry("engine")


def param_groups(params: List[nn.Parameter], weight_decay: float) -> List[dict]:
    """AdamW groups: matrices decay, biases and norm scales do not."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(name: str, groups: List[dict], lr: float, betas) -> torch.optim.Optimizer:
    """``adamw`` (torch) or ``adamw8bit`` (bitsandbytes: moments in 8 bits, 2 bytes a parameter)."""
    if name == "adamw8bit":
        import bitsandbytes as bnb  # optional (gpu extra), heavy: only for 8/4-bit layers and optimizers

        return bnb.optim.AdamW8bit(groups, lr=lr, betas=tuple(betas))
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


class Engine:
    """Base class; subclasses register in ``ENGINES`` under the recipe's ``engine`` name."""

    name = ""
    optimizer: torch.optim.Optimizer  # set by each engine: the one whose param groups take the lr

    def __init__(self, recipe: Recipe, model: nn.Module, device: torch.device, dist: DistEnv, bf16: bool):
        self.recipe, self.model, self.device, self.dist, self.bf16 = recipe, model, device, dist, bf16

    def describe(self) -> str:
        """One line for the log: which engine ran, with what."""
        return f"{self.name} (world size {self.dist.world_size})"

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward(self, fn, *args):
        """Run one micro-batch's ``fn(*args)`` (the loss step) under the engine's bookkeeping."""
        return fn(*args)

    def backward(self, loss: torch.Tensor, finite: bool) -> None:
        """Accumulate one micro-batch's gradients (``finite``: the loss is finite on this rank)."""
        raise NotImplementedError

    def step(self, finite: bool) -> Optional[torch.Tensor]:
        """Update at the end of the accumulation (``finite``: every micro-batch's loss was finite
        on this rank); the gradient norm, or None when the step was skipped for non-finite values
        on any rank (nothing changed, gradients cleared)."""
        raise NotImplementedError

    def clipped_norm(self, params) -> Optional[torch.Tensor]:
        """Clip the gradients of ``params`` to ``optim.grad_clip`` (already averaged over ranks);
        their norm, or None if it is not finite on some rank."""
        norm = torch.nn.utils.clip_grad_norm_(params, self.recipe.optim.grad_clip or float("inf"))
        return norm if self.dist.all_true(bool(torch.isfinite(norm)), self.device) else None

    def model_state(self) -> Dict[str, torch.Tensor]:
        """The full model state dict (gathered where the engine partitions parameters)."""
        return self.model.state_dict()

    def save(self, directory: Path) -> Optional[dict]:
        """Write the optimizer state into ``directory`` (every rank calls it); returns JSON meta."""
        raise NotImplementedError

    def load(self, directory: Path, model_state: Dict[str, torch.Tensor], meta: dict) -> None:
        """Restore model and optimizer state from a checkpoint directory written by ``save``."""
        raise NotImplementedError
