"""Teacher registry: one file per family, registered by decorator; ``build_teacher(cfg)``."""
import torch

from ..schema import TeacherConfig
from .base import (TEACHERS, Features, Teacher, TeacherSpec, can_be_student, default_model, graph_problems,
                   is_graph_teacher, ships_weights, small_random_config)
from . import clip, dinov2, efficientnet_lite, hed, mobilenet_v2, onnx_model, sam, timm_model  # noqa: F401  (registration)


def build_teacher(cfg: TeacherConfig) -> Teacher:
    """Build a registered teacher family from its recipe entry (weights loaded, not frozen)."""
    teacher = TEACHERS.get(cfg.family)(cfg)
    if teacher.channels_last:
        teacher.to(memory_format=torch.channels_last)
    return teacher.pool_dense(cfg.dense_grid) if cfg.dense_grid else teacher


__all__ = ["TEACHERS", "Features", "Teacher", "TeacherSpec", "build_teacher", "can_be_student", "default_model",
           "graph_problems", "is_graph_teacher", "ships_weights", "small_random_config"]
