"""Any timm image model as a teacher (or the student's base): ViTs, ConvNeXts, ResNets, ...

Weights: ``hub`` downloads through timm (online only), a path loads a local safetensors or
``weights_only`` .pt state dict, ``none`` keeps the random init. Token models give global =
the class token (or the mean of patch tokens) and dense = patch tokens on their grid; map
models give the pooled map and the map. ``layer: k`` takes block k's output as the dense map.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import TeacherConfig
from .base import TEACHERS, Features, Teacher, TeacherSpec, student_base
from .weights import load_state_dict

LORA_LEAVES = ("qkv", "proj", "fc1", "fc2")


class TimmTeacher(Teacher):
    def __init__(self, model: str, weights: str = "none", input_size: int = 0, layer="last"):
        super().__init__()
        import timm

        if not model:
            raise ValueError("the timm teacher family needs 'model' (a timm model name, e.g. vit_small_patch16_224)")
        kwargs = {"num_classes": 0}
        if input_size:
            kwargs["img_size"] = input_size
        try:
            self.net = timm.create_model(model, pretrained=weights == "hub", **kwargs)
        except TypeError:  # models without img_size (CNNs) take any size
            kwargs.pop("img_size", None)
            self.net = timm.create_model(model, pretrained=weights == "hub", **kwargs)
        if weights not in ("hub", "none"):
            state = {k: v for k, v in load_state_dict(weights).items() if not k.startswith("head.")}
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{weights} does not fit timm model {model!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        cfg = self.net.pretrained_cfg
        self.layer = layer
        self.spec = TeacherSpec(family="timm", input_size=input_size or cfg["input_size"][-1],
                                mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), extra={"model": model})
        self.describe_dims()

    @property
    def is_token_model(self) -> bool:
        return hasattr(self.net, "patch_embed") and hasattr(self.net, "num_prefix_tokens")

    def _tokens_to_features(self, tokens: torch.Tensor, size) -> Features:
        n_prefix = self.net.num_prefix_tokens
        patches = tokens[:, n_prefix:]
        h, w = self.net.patch_embed.dynamic_feat_size(size) if hasattr(self.net.patch_embed, "dynamic_feat_size") else self.net.patch_embed.grid_size
        dense = patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        global_ = tokens[:, 0] if getattr(self.net, "cls_token", None) is not None else patches.mean(1)
        return Features(global_, dense)

    def forward_features(self, x):
        out = self.net.forward_features(x)
        if self.is_token_model:
            feats = self._tokens_to_features(out, x.shape[-2:])
        else:
            feats = Features(out.mean((2, 3)), out)
        if self.layer != "last":
            (dense,) = self.net.forward_intermediates(x, indices=[int(self.layer)], intermediates_only=True, output_fmt="NCHW")
            feats = Features(feats.global_, dense)
        return feats

    def student_features(self, x):
        return self.forward_features(x)

    def lora_targets(self):
        return ["net." + n for n, m in self.net.named_modules() if isinstance(m, nn.Linear)
                and n.split(".")[-1] in LORA_LEAVES and n.startswith(("blocks", "stages", "layers"))]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)


@TEACHERS.register("timm")
@student_base
def timm_teacher(cfg: TeacherConfig) -> Teacher:
    return TimmTeacher(cfg.model, cfg.weights, cfg.input_size, cfg.layer)
