"""Teacher registry: one file per family, registered by decorator; ``build_teacher(cfg)``."""
from ..config import TeacherConfig
from .base import TEACHERS, Features, Teacher, TeacherSpec, can_be_student, ships_weights
from . import clip, dinov2, efficientnet_lite, hed, mobilenet_v2, sam, timm_model  # noqa: F401  (registration)


def build_teacher(cfg: TeacherConfig) -> Teacher:
    """Build a registered teacher family from its recipe entry (weights loaded, not frozen)."""
    return TEACHERS.get(cfg.family)(cfg)


__all__ = ["TEACHERS", "Features", "Teacher", "TeacherSpec", "build_teacher", "can_be_student", "ships_weights"]
