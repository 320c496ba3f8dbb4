"""The DeepSpeed engine: ZeRO stage 0-3, optimizer (and, at stage 3, parameter) offload to CPU,
bf16 mixed precision, over the trainable part of the model (student + heads).

- The normalisers stay outside DeepSpeed's module: they are fitted, frozen and must stay fp32
  (bf16 would change the targets).
- DeepSpeed accumulates over ``train.grad_accum`` micro-batches itself (``backward`` steps it at
  every micro-batch; it updates only at the boundary) and clips to ``optim.grad_clip``.
- Non-finite gradients: ZeRO 1-3 and bf16 detect them and skip the update on every rank
  (``was_step_applied``); at stage 0 in fp32 DeepSpeed neither checks nor reports a norm, so this
  engine clips, checks and, when needed, drops the gradients itself before the step.
- The saved model holds the fp32 master weights of what trains (ZeRO 1-3), not the bf16 copies
  the forward uses; frozen weights (the base in adapter mode) are the bf16 copies.
- With ``offload_optimizer: cpu`` the optimizer is DeepSpeed's own CPU AdamW (compiled on first
  use, 1-2 min); otherwise the torch (or bitsandbytes 8-bit) AdamW is handed to DeepSpeed.
- Checkpoints: DeepSpeed's own files in ``<checkpoint>/deepspeed/`` (fp32 master weights and
  partitioned optimizer state, written and read by DeepSpeed with ``torch.save``/``torch.load``:
  the one place this project reads pickles, and only files it wrote itself) next to the
  safetensors model that ``lowres_kd.load`` reads.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ...engine_config import checks_overflow, deepspeed_config
from ...heads import Head
from ..distributed import backend_for, single_process_env
from .base import ENGINES, Engine, make_optimizer, param_groups

TRAINABLE = ("student", "heads")  # the submodules DeepSpeed manages; the rest (normalisers) stays fp32
TAG = "state"


@ENGINES.register("deepspeed")
class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, recipe, model, device, dist, bf16):
        super().__init__(recipe, model, device, dist, bf16)
        import deepspeed  # optional (deepspeed extra), heavy: only for this engine

        if dist.world_size == 1:
            single_process_env()
        if not dist.active:
            deepspeed.init_distributed(dist_backend=backend_for(device))
        self.trainable = TrainableParts({name: getattr(model, name) for name in TRAINABLE})
        # DeepSpeed views each parameter as bytes to broadcast and partition it, which needs a unit
        # last stride: a channels-last conv weight (1x1 ones included, which is_contiguous() passes)
        # goes back to NCHW; a channels-last input still selects the NHWC kernels
        for p in self.trainable.parameters():
            if p.dim() and p.stride(-1) != 1:
                p.data = p.data.clone(memory_format=torch.contiguous_format)
        ds = recipe.deepspeed
        if ds.zero_stage == 3:  # Head.forward reads its submodules' weights (fused loss, upsampled trunk)
            for m in self.trainable.modules():
                if isinstance(m, Head):
                    for p in m.parameters():
                        deepspeed.zero.register_external_parameter(m, p)
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        groups = param_groups(params, recipe.optim.weight_decay)
        optimizer = None if ds.offload_optimizer != "none" else make_optimizer(
            recipe.optim.name, groups, recipe.optim.lr, recipe.optim.betas)
        self.config = deepspeed_config(recipe, bf16, device.type == "cuda")
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=self.trainable, optimizer=optimizer,
                                                              model_parameters=groups, config=self.config)
        self._checks_overflow = checks_overflow(recipe, bf16)
        self._params = params

    def describe(self) -> str:
        ds = self.recipe.deepspeed
        return (f"deepspeed (ZeRO-{ds.zero_stage}, offload_optimizer {ds.offload_optimizer}, offload_param "
                f"{ds.offload_param}, bf16 {self.bf16}, {type(self.optimizer).__name__}, world size {self.dist.world_size})")

    def forward(self, fn, *args):
        return self.ds(fn, *args)  # DeepSpeed's forward resets its per-micro-batch gradient state

    def backward(self, loss, finite):
        # a non-finite loss still goes through backward: DeepSpeed's micro-step count must advance,
        # and its NaN gradients make the boundary step skip (or, at stage 0 fp32, step() drops them)
        self.ds.backward(loss)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # counts the micro-step; no update before the boundary

    def step(self, finite):
        # ``finite`` is not needed: a non-finite loss left non-finite gradients, found below
        if not self._checks_overflow:  # gradients already averaged over ranks at the boundary
            norm = self.clipped_norm(self._params)
            if norm is None:
                for p in self._params:
                    p.grad = None  # torch optimizers leave parameters without gradients untouched
            self.ds.step()
            return norm
        self.ds.step()
        if not self.ds.was_step_applied():
            return None
        norm = self.ds.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
        return norm if math.isfinite(float(norm)) else None

    def _gathered(self):
        import deepspeed  # optional (deepspeed extra), heavy: only for this engine

        if self.recipe.deepspeed.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.trainable.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def model_state(self):
        with self._gathered():
            state = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                     for k, v in self.model.state_dict().items()}
        if self.bf16 and self.recipe.deepspeed.zero_stage >= 1:  # the fp32 masters, not the bf16 copies
            from deepspeed.utils import safe_get_full_fp32_param  # optional, as above

            for name, p in self.trainable.named_parameters():
                if p.requires_grad:  # every rank takes part (a gather at stage 3)
                    state[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
        return state

    def save(self, directory: Path) -> Optional[dict]:
        self.ds.save_checkpoint(str(directory / "deepspeed"), tag=TAG, save_latest=False)
        return None

    def load(self, directory, model_state, meta):
        outside = {k: v for k, v in model_state.items() if not k.startswith(tuple(f"{n}." for n in TRAINABLE))}
        missing, unexpected = self.model.load_state_dict(outside, strict=False)
        stray = [k for k in missing if not k.startswith(tuple(f"{n}." for n in TRAINABLE))]
        if stray or unexpected:
            raise ValueError(f"{directory}: model state does not fit: missing {stray[:5]}, unexpected {unexpected[:5]}")
        path, _ = self.ds.load_checkpoint(str(directory / "deepspeed"), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"{directory / 'deepspeed'}: no readable DeepSpeed state (engine: deepspeed)")


class TrainableParts(nn.ModuleDict):
    """The student and heads as the one module DeepSpeed wraps. Its forward runs a given loss
    step, so every micro-batch passes through DeepSpeed's forward (ZeRO keeps per-micro-batch
    state there) while the step itself calls the submodules as usual."""

    def forward(self, fn, *args):
        return fn(*args)
