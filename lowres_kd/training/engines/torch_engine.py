"""The plain PyTorch engine: AdamW (or bitsandbytes 8-bit AdamW) over the trainable parameters.

With several ranks (``torchrun``) the gradients are averaged with one flat all-reduce at the end
of each accumulation (no overlap with backward, unlike DDP or DeepSpeed; simple and exact), so
every rank applies the same update and the parameters stay identical.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as torch_dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ...rundir import checkpoint as ckpt
from ..distributed import backend_for
from .base import ENGINES, Engine, make_optimizer, param_groups


@ENGINES.register("torch")
class TorchEngine(Engine):
    name = "torch"

    def __init__(self, recipe, model, device, dist, bf16):
        super().__init__(recipe, model, device, dist, bf16)
        o = recipe.optim
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(o.name, param_groups(self.params, o.weight_decay), o.lr, o.betas)
        if dist.world_size > 1 and not dist.active:
            torch_dist.init_process_group(backend_for(device))

    def describe(self) -> str:
        return f"torch ({self.recipe.optim.name}, world size {self.dist.world_size})"

    def backward(self, loss, finite):
        if finite:
            (loss / self.recipe.train.grad_accum).backward()

    def _average_gradients(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = _flatten_dense_tensors(grads)
        torch_dist.all_reduce(flat)
        flat /= self.dist.world_size
        for p, g in zip(self.params, _unflatten_dense_tensors(flat, grads)):
            p.grad = g

    def step(self, finite):
        norm = None
        if self.dist.all_true(finite, self.device):
            if self.dist.world_size > 1:
                self._average_gradients()
            norm = self.clipped_norm(self.params)  # a finite loss can still give inf/NaN gradients (bf16)
        if norm is not None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, directory: Path) -> Optional[dict]:
        if not self.dist.is_main:
            return None
        tensors, meta = ckpt.optimizer_to_tensors(self.optimizer.state_dict())
        ckpt.write_tensors(directory / "optimizer.safetensors", tensors)
        return meta

    def load(self, directory, model_state, meta):
        self.model.load_state_dict(model_state)
        tensors = ckpt.read_tensors(directory / "optimizer.safetensors")
        self.optimizer.load_state_dict(ckpt.optimizer_from_tensors(tensors, meta["optimizer"]))
