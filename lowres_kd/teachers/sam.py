"""Segment Anything's image encoder (Kirillov et al. 2023) through timm's ``samvit``.

Default ``samvit_base_patch16.sa1b`` at 512 px, not SAM's native 1024 (four times fewer tokens,
what a small lab can run): a 32x32 grid at stride 16, ImageNet mean/std. Dense = the neck's map
(256 channels), global = its mean; ``layer: k`` = block k's output (768 channels for SAM-B).
timm's samvit gives a map, not tokens, and has no ``num_prefix_tokens``: ``TimmTeacher`` tells
the two apart by the shape of ``forward_features``' output. It can be the student's base.

Checkpoints are made at 1024 px, and timm's filter (which converts facebook's original
``sam_vit_b_01ec64.pth``) does not resize samvit's position tables: ``fit_positions`` resamples
them to this model's grid exactly as samvit itself does at run time for other input sizes, so a
model built at 512 px equals one built at 1024 px fed 512-px images.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed_nhwc
from torch import nn

from ..schema import TeacherConfig
from .base import TEACHERS, Teacher, no_shipped_weights, small_random, student_base
from .timm_model import TimmFamily


def fit_positions(state: Dict[str, torch.Tensor], net: nn.Module) -> Dict[str, torch.Tensor]:
    """The absolute (1, H, W, C) table and the global-attention blocks' relative (2S - 1, C)
    tables resampled to ``net``'s sizes (bicubic / linear, as ``samvit`` and ``get_rel_pos``)."""
    own = net.state_dict()
    out = dict(state)
    for k, v in state.items():
        if k not in own or v.shape == own[k].shape:
            continue
        if k == "pos_embed":
            out[k] = resample_abs_pos_embed_nhwc(v, list(own[k].shape[1:3]))
        elif k.endswith(("attn.rel_pos_h", "attn.rel_pos_w")):
            out[k] = F.interpolate(v.T[None], size=own[k].shape[0], mode="linear")[0].T
    return out


SAM = TimmFamily("sam", model="samvit_base_patch16.sa1b", input_size=512, models=("samvit_*",),
                 adapt_state=fit_positions)


@TEACHERS.register("sam")
@small_random(model="samvit_base_patch16", input_size=32)
@student_base
@no_shipped_weights
def sam(cfg: TeacherConfig) -> Teacher:
    return SAM.build(cfg)
