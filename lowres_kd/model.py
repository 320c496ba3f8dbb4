"""The student and the inherited model that training produces and ``lowres_kd.load`` returns.

``Student`` wraps a backbone of the base teacher's family in one of three modes (DESIGN §2.4):
``adapter`` (frozen base weights + peft LoRA; the base teacher's targets come from the same
weights with the adapter disabled; the base may be 8/4-bit, QLoRA-style), ``full`` (every weight trains), ``scratch`` (random init).
``InheritedModel`` adds, per teacher, the heads and the fitted normalisers, and maps the
student's features back into every teacher's raw space.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .lowmem import QuantReport
from .schema import StudentConfig
from .heads import TeacherHeads
from .normalizers import build_normalizer
from .teachers import Features, Teacher, TeacherSpec


class Student(nn.Module):
    """``quantization``: the report of the frozen base's 8/4-bit linears (adapter mode), else None."""

    def __init__(self, backbone: Teacher, cfg: StudentConfig, quantization: Optional[QuantReport] = None):
        super().__init__()
        self.mode = cfg.mode
        self.quantization = quantization
        self.input_size = cfg.input_size or backbone.spec.input_size
        backbone.set_grad_checkpointing(cfg.grad_checkpointing)
        if self.mode == "adapter":
            from peft import LoraConfig, get_peft_model  # pulls in transformers (seconds): adapter mode only

            backbone.requires_grad_(False)
            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=backbone.lora_targets())
            self.backbone = get_peft_model(backbone, lora)
        else:
            backbone.requires_grad_(True)
            self.backbone = backbone

    @property
    def body(self) -> Teacher:
        """The backbone module itself (inside peft's wrapper in adapter mode)."""
        return self.backbone.base_model.model if self.mode == "adapter" else self.backbone

    def forward(self, images: torch.Tensor) -> Features:
        body = self.body
        return body.student_features(body.preprocess(images, self.input_size))

    @torch.no_grad()
    def base_features(self, images: torch.Tensor) -> Features:
        """The base teacher's features: the same (possibly 8/4-bit) weights with the adapter
        disabled, always in eval mode (bitsandbytes' int8 layers compute differently in training
        mode on a CPU; the targets must not depend on when they are asked for)."""
        if self.mode != "adapter":
            raise RuntimeError("base_features needs student.mode 'adapter'")
        was = self.training
        self.eval()
        try:
            with self.backbone.disable_adapter():
                return self.body(images)
        finally:
            self.train(was)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.mode == "adapter":  # frozen base: its batch-norm statistics must not move
            for m in self.body.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


class InheritedModel(nn.Module):
    """Student + per-teacher heads + normalisers.

    ``model(images)``: images (N, 3, H, W) RGB in [0, 1] ->
    ``{"global": (N, D), "dense": (N, D, h, w), "teachers": {name: {"global": (N, C_t),
    "dense": (N, C_t, h_t, w_t)}}}``, teacher outputs in each teacher's raw (denormalised) space.
    """

    def __init__(self, student: Student, specs: Dict[str, TeacherSpec], head_hidden: int, normalizer: str):
        super().__init__()
        self.student = student
        self.specs = dict(specs)
        dims = student.body.student_dims()
        self.heads = nn.ModuleDict({n: TeacherHeads(dims, (s.global_dim, s.dense_dim), s.grid, head_hidden) for n, s in specs.items()})
        self.norm_global = nn.ModuleDict({n: build_normalizer(normalizer, s.global_dim) for n, s in specs.items()})
        self.norm_dense = nn.ModuleDict({n: build_normalizer(normalizer, s.dense_dim) for n, s in specs.items()})

    def normalise(self, name: str, feats: Features) -> Features:
        return Features(self.norm_global[name](feats.global_), self.norm_dense[name](feats.dense))

    def forward(self, images: torch.Tensor) -> dict:
        feats = self.student(images)
        teachers = {}
        for name, heads in self.heads.items():
            g, d = heads(feats.global_, feats.dense)
            teachers[name] = {"global": self.norm_global[name].inverse(g), "dense": self.norm_dense[name].inverse(d)}
        return {"global": feats.global_, "dense": feats.dense, "teachers": teachers}
