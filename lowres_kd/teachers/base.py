"""The one interface every teacher (and every student backbone) offers.

A teacher takes RGB images in [0, 1] of any size, applies its own preprocessing (resize to its
input size, its mean/std) and returns ``Features(global_, dense)``: global (N, C) and dense
(N, C, h, w). Teachers are frozen: ``eval()``, no gradients, called under ``no_grad`` by the
trainer. A backbone that can also be the student (knowledge preservation, DESIGN §2.4)
implements ``student_features`` (a dense tap fine enough for edges) and ``lora_targets``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..registry import Registry

TEACHERS = Registry("teacher")


def student_base(builder):
    """Marks a registered family whose backbone can be the student (it implements
    ``student_features`` and ``lora_targets``); recipes may only name these as ``base``."""
    builder.can_be_student = True
    return builder


def can_be_student(family: str) -> bool:
    return getattr(TEACHERS.get(family), "can_be_student", False)


def no_shipped_weights(builder):
    """Marks a registered family with no weights inside the distribution: its ``weights`` is
    ``hub``, a file or ``none``, never ``shipped``."""
    builder.ships_weights = False
    return builder


def ships_weights(family: str) -> bool:
    return getattr(TEACHERS.get(family), "ships_weights", True)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Features(NamedTuple):
    global_: torch.Tensor  # (N, C)
    dense: torch.Tensor  # (N, C, h, w)


@dataclass
class TeacherSpec:
    """What the rest of the system needs to know about a teacher, without its weights."""

    family: str
    input_size: int
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    global_dim: int = 0
    dense_dim: int = 0
    grid: Tuple[int, int] = (0, 0)
    extra: dict = field(default_factory=dict)


class Teacher(nn.Module):
    """Base class: preprocessing + ``forward_features``; subclasses set ``self.spec``."""

    spec: TeacherSpec

    def preprocess(self, images: torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
        size = size or self.spec.input_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = images.new_tensor(self.spec.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.spec.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def forward_features(self, x: torch.Tensor) -> Features:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> Features:
        return self.forward_features(self.preprocess(images))

    # -- used when this backbone is the student ------------------------------------------
    def student_features(self, x: torch.Tensor) -> Features:
        """Global and a fine dense map for the student; ``x`` is already preprocessed."""
        raise NotImplementedError(f"teacher family {self.spec.family!r} cannot be the student's base")

    def lora_targets(self) -> List[str]:
        raise NotImplementedError(f"teacher family {self.spec.family!r} has no LoRA targets")

    def student_dims(self) -> Tuple[int, int]:
        """(global_dim, dense_dim) of ``student_features``, read from a dry run."""
        with torch.no_grad():
            f = self.student_features(torch.zeros(1, 3, self.spec.input_size, self.spec.input_size))
        return f.global_.shape[1], f.dense.shape[1]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def freeze(self) -> "Teacher":
        self.eval()
        self.requires_grad_(False)
        return self

    def describe_dims(self) -> None:
        """Fill global/dense widths and the grid in ``spec`` from a dry run at the input size."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            s = self.spec.input_size
            f = self.forward_features(torch.zeros(1, 3, s, s))
        self.train(was_training)
        self.spec.global_dim, self.spec.dense_dim = f.global_.shape[1], f.dense.shape[1]
        self.spec.grid = tuple(f.dense.shape[-2:])


def pointwise_lora_targets(module: nn.Module, prefix: str = "") -> List[str]:
    """Names of the 1x1, ungrouped convolutions and the linears: the 'MLP' of a CNN for LoRA."""
    names = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1:
            names.append(prefix + name)
        elif isinstance(m, nn.Linear):
            names.append(prefix + name)
    return names


def fuse_dense(maps: List[torch.Tensor]) -> torch.Tensor:
    """Concatenate maps of several strides on the grid of the finest (bilinear upsampling)."""
    size = maps[0].shape[-2:]
    up = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
    return torch.cat(up, dim=1)


@contextlib.contextmanager
def _buffers_restored(module: nn.Module):
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def checkpointed(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` under activation checkpointing whose recomputation in backward leaves the
    layer's buffers as the forward pass left them: batch-norm running statistics (and their
    batch count) would otherwise move twice per training step."""
    return checkpoint(layer, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _buffers_restored(layer)))
