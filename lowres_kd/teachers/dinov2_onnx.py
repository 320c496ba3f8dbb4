"""A DINOv2 ViT exported to ONNX from Hugging Face ``Dinov2Model``, read back as a timm state dict.

The exporter keeps Hugging Face names for norms, biases, ``cls_token``, layer scale and the patch
projection, but the linear weights become anonymous ``onnx::MatMul_*`` initializers stored
[in, out]; they are named here by the MatMul node that consumes them
(``/backbone/encoder/layer.<i>/attention/attention/query/MatMul`` ...). The position table is
split in two initializers (class position (1, 1, C), patch table (1, L, C)) that the graph
joins with a Concat after resampling the patch part. The result is the state dict of timm's
``vit_small_patch14_dinov2`` family at the table's own size (37 x 37 patches: 518 px): q, k, v
joined into ``qkv``, layer scale as ``ls1.gamma`` / ``ls2.gamma``, ``pos_embed`` with the class
position first. Only ``onnx`` is needed (no onnxruntime, no transformers).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict

import numpy as np
import torch

PREFIX = "backbone."
LINEAR = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                    r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
TIMM_LINEAR = {"attention/output/dense": "attn.proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
TIMM_BIAS = {"attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
             "norm1": "norm1", "norm2": "norm2"}


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C"))  # a copy: onnx's arrays are read-only


def _position_table(inits: Dict[str, np.ndarray], consumers: Dict[str, list], width: int) -> torch.Tensor:
    """(1, 1 + L, C): the class position and the patch table, the two anonymous initializers the
    embedding subgraph consumes."""
    parts = {name: a for name, a in inits.items() if name.startswith("onnx::")
             and any(n.startswith("/backbone/embeddings/") for n in consumers[name])}
    cls = [a for a in parts.values() if a.shape == (1, 1, width)]
    patches = [a for a in parts.values() if a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == width
               and a.shape[1] > 1 and math.isqrt(a.shape[1]) ** 2 == a.shape[1]]
    if len(cls) != 1 or len(patches) != 1:
        raise ValueError(f"expected one class position (1, 1, {width}) and one square patch table among the "
                         f"embedding initializers, found {[(n, a.shape) for n, a in parts.items()]}")
    return _tensor(np.concatenate([cls[0], patches[0]], axis=1))


def timm_state_from_onnx(path: str | Path) -> Dict[str, torch.Tensor]:
    """The timm ``vit_*_patch14_dinov2`` state dict of the ``backbone.*`` ViT in ONNX file ``path``."""
    import onnx  # optional dependency, only needed to convert
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node.name)
    hf = {k[len(PREFIX):]: v for k, v in inits.items() if k.startswith(PREFIX)}
    if "embeddings.cls_token" not in hf:
        raise ValueError(f"{path}: no backbone.embeddings.cls_token initializer: not a Dinov2Model export")
    width = hf["embeddings.cls_token"].shape[-1]

    linears: Dict[tuple, np.ndarray] = {}
    for name, a in inits.items():
        users = consumers[name]
        if name.startswith("onnx::MatMul") and len(users) == 1 and (m := LINEAR.match(users[0])):
            linears[int(m.group(1)), m.group(2)] = a.T  # stored [in, out]; torch keeps [out, in]
    depth = 1 + max((i for i, _ in linears), default=-1)
    if depth == 0 or len(linears) != 6 * depth:
        raise ValueError(f"{path}: found {len(linears)} encoder MatMul weights, expected 6 per layer")

    state = {"cls_token": _tensor(hf["embeddings.cls_token"]),
             "pos_embed": _position_table(inits, consumers, width),
             "patch_embed.proj.weight": _tensor(hf["embeddings.patch_embeddings.projection.weight"]),
             "patch_embed.proj.bias": _tensor(hf["embeddings.patch_embeddings.projection.bias"]),
             "norm.weight": _tensor(hf["layernorm.weight"]), "norm.bias": _tensor(hf["layernorm.bias"])}
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        qkv = ("attention/attention/query", "attention/attention/key", "attention/attention/value")
        state[dst + "attn.qkv.weight"] = _tensor(np.concatenate([linears[i, k] for k in qkv]))
        state[dst + "attn.qkv.bias"] = _tensor(np.concatenate(
            [hf[f"{src}attention.attention.{k}.bias"] for k in ("query", "key", "value")]))
        for onnx_name, timm_name in TIMM_LINEAR.items():
            state[f"{dst}{timm_name}.weight"] = _tensor(linears[i, onnx_name])
        for hf_name, timm_name in TIMM_BIAS.items():
            state[f"{dst}{timm_name}.bias"] = _tensor(hf[f"{src}{hf_name}.bias"])
        for norm in ("norm1", "norm2"):
            state[f"{dst}{norm}.weight"] = _tensor(hf[f"{src}{norm}.weight"])
        state[dst + "ls1.gamma"] = _tensor(hf[src + "layer_scale1.lambda1"])
        state[dst + "ls2.gamma"] = _tensor(hf[src + "layer_scale2.lambda1"])
    return state
