"""CLIP image towers (Radford et al. 2021) through timm.

Default ``vit_large_patch14_clip_224.openai`` at 224 px (16x16 grid of 14-px patches), CLIP's own
mean/std from timm's pretrained config. Global = the class token after the final LayerNorm,
*before* CLIP's projection into the joint image-text space (1024 wide for ViT-L, not 768): the
projection is timm's classifier head, which teachers drop. Dense = the patch tokens. It can be the
student's base. Local files: timm's ``model.safetensors`` or an open_clip checkpoint (``visual.*``
keys, converted by timm's checkpoint filter); OpenAI's original TorchScript ``.pt`` archives are
not state dicts and are refused.
"""
from ..schema import TeacherConfig
from .base import TEACHERS, Teacher, no_shipped_weights, small_random, student_base
from .timm_model import TimmFamily

CLIP = TimmFamily("clip", model="vit_large_patch14_clip_224.openai", input_size=224, models=("vit_*_clip_*",))


@TEACHERS.register("clip")
@small_random(model="vit_xsmall_patch16_clip_224", input_size=32)
@student_base
@no_shipped_weights
def clip(cfg: TeacherConfig) -> Teacher:
    return CLIP.build(cfg)
