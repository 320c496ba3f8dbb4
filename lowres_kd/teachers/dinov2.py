"""DINOv2 (Oquab et al. 2023) through timm: the general-purpose base teacher of DESIGN §1.

Default ``vit_large_patch14_dinov2.lvd142m`` at 224 px (a 16x16 grid of 14-px patches; timm's own
default is 518 px, position embeddings are resampled at load), ImageNet mean/std. Global = the
class token, dense = the patch tokens after the final norm (the ``reg4`` variants' register tokens
left out); ``layer: k`` = block k's output. It can be the student's base: a ViT-B/14 student
(``student: {mode: full, family: dinov2, model: vit_base_patch14_dinov2.lvd142m}``) for a
DINOv2-L base teacher. Local files: timm's ``model.safetensors`` or facebook's original
``dinov2_vit*14_pretrain.pth`` (converted by timm's checkpoint filter).
"""
from ..config import TeacherConfig
from .base import TEACHERS, Teacher, no_shipped_weights, student_base
from .timm_model import TimmFamily

DINOV2 = TimmFamily("dinov2", model="vit_large_patch14_dinov2.lvd142m", input_size=224,
                    models=("vit_*_patch14_dinov2", "vit_*_patch14_reg4_dinov2"))


@TEACHERS.register("dinov2")
@student_base
@no_shipped_weights
def dinov2(cfg: TeacherConfig) -> Teacher:
    return DINOV2.build(cfg)
