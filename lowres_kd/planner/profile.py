"""What the planner measures about a recipe's models, on the ``meta`` device (DESIGN §3).

``profile_recipe(recipe, device_type, engine)`` builds the student (with its adapter), the heads,
the normalisers and every teacher as the trainer does, but on ``meta`` with ``weights: none``:
real architectures, no memory, no weight files. From them it reads

- parameter counts per module and dtype: trainable (LoRA or backbone, heads), frozen (the base in
  adapter mode, its linears apart: they are counted at the base's bits), each teacher split into
  its offload blocks and its quantizable linears;
- activation bytes of one training micro-step (``memtrack.LiveBytes``), with and without
  gradient checkpointing: what the student's forward keeps for backward, what the heads keep,
  what the loss keeps, the working memory above that at the step's peak, and how many parameter
  gradients exist at that peak when the backward makes them (the step's first micro-batch);
- each teacher's ``no_grad`` forward peak (the largest live set during its forward, output
  included);
- FLOPs per image of the step and of the teachers (``torch.utils.flop_counter``'s formulas).

Steps and teacher forwards are measured at each micro-batch size the planner asks about, once
(cached): what is kept grows linearly with the batch, but where the peak falls does not (with few
images the end of backward, where every gradient exists, can be the peak; with many, its start),
so two sizes extended linearly missed by up to 70 % in ``benchmarks/check_planner.py``.

On CUDA the step runs under the emulated bf16 autocast of ``memtrack.emulate_device``, the
DeepSpeed engine's student and heads in bf16 (DeepSpeed casts them), and the teachers in bf16.
A family whose module cannot be built on ``meta`` is built on the CPU with ``weights: none`` and
moved to ``meta`` for the measurements (``notes`` says so). A graph teacher (family ``onnx``) is
built as written (its weights are the graph) and not measured: it runs in onnxruntime, outside
torch's memory, so it adds no device bytes to the plan (``notes`` says so).
"""
from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from lowres_kd_kernels import triton_import_error
from torch import nn

from ..build import build_model, student_backbone_config, teacher_specs
from ..errors import UserError
from ..heads import dense_rows
from ..losses import fused_linear_distill_reference
from ..lowmem import find_blocks
from ..model import Student
from ..schema import Recipe
from ..teachers import Features, Teacher, build_teacher, is_graph_teacher
from .arithmetic import Weights
from .memtrack import LiveBytes, emulate_device

META = torch.device("meta")


class PlanError(UserError, RuntimeError):
    """The planner cannot estimate this recipe (a model that builds neither on meta nor on CPU)."""


@dataclass
class TeacherProfile:
    name: str
    outside: Weights  # what stays on the device when the teacher is offloaded
    blocks: List[Weights]  # the offload block list (lowres_kd.lowmem.enable_offload)
    target_numel: int  # per image: global + dense features
    is_student: bool = False  # adapter mode's base: the student's own weights, adapter disabled
    runs: bool = True  # False when the targets come from the cache, or a graph runs them outside torch
    measure: Optional[Callable[[int], Tuple[int, float]]] = field(default=None, repr=False)
    _forward: Dict[int, Tuple[int, float]] = field(default_factory=dict, repr=False)

    def _at(self, batch: int) -> Tuple[int, float]:
        if not self.runs:
            return 0, 0.0
        if batch not in self._forward:
            self._forward[batch] = self.measure(batch)
        return self._forward[batch]

    def forward_peak(self, batch: int) -> int:
        """Bytes of the ``no_grad`` forward's peak (output included) at this micro-batch."""
        return self._at(batch)[0]

    def flops_per_image(self, batch: int) -> float:
        return self._at(batch)[1]


@dataclass
class StepProfile:
    """One training micro-step at one micro-batch size: bytes alive at the end of each part of the
    forward, and the working memory above all of them at the step's peak (forward or backward)."""

    student: int
    heads: int
    loss: int
    forward_working: int  # the forward's peak above what it keeps (loss temporaries, ...)
    backward_working: int  # the backward's peak above what the forward kept, less the parameter gradients made
    #                        by then (negative when the peak comes at the end, the activations freed)
    grads_at_peak: int  # parameter gradients the backward has made by its peak, when it makes them
    flops_per_image: float

    def working(self, fresh_grads: bool) -> int:
        """Working memory at the step's peak; ``fresh_grads``: the gradients are made in this backward
        (the step's first micro-batch, all of it when grad_accum is 1), so those made by the peak count."""
        backward = self.backward_working + (self.grads_at_peak if fresh_grads else 0)
        return max(0, self.forward_working, backward)


@dataclass
class RecipeProfile:
    device_type: str
    engine: str
    bf16: bool
    loss_backend: str  # torch (the eager reference) | triton (the fused kernel)
    trainable: List[int]  # element count of each trainable student tensor (LoRA, or the backbone)
    heads: List[int]  # element count of each head tensor (all train)
    frozen: Weights  # the student's frozen tensors (the base in adapter mode), its linears apart
    largest_layer: int  # most parameters in one module (ZeRO-3 gathers a layer at a time)
    normaliser_bytes: int
    teachers: List[TeacherProfile]
    notes: List[str] = field(default_factory=list)
    measure_step: Optional[Callable[[bool, int], StepProfile]] = field(default=None, repr=False)
    _steps: Dict[Tuple[bool, int], StepProfile] = field(default_factory=dict, repr=False)

    @property
    def frozen_numel(self) -> int:
        """Frozen floating elements of the student (the base in adapter mode)."""
        return self.frozen.numel

    @property
    def frozen_fixed_bytes(self) -> int:
        """Non-floating student buffers."""
        return self.frozen.fixed_bytes

    def step(self, checkpointing: bool, batch: int) -> StepProfile:
        """The micro-step with or without gradient checkpointing at this micro-batch (measured once)."""
        if (checkpointing, batch) not in self._steps:
            self._steps[checkpointing, batch] = self.measure_step(checkpointing, batch)
        return self._steps[checkpointing, batch]


# ----------------------------------------------------------------------------- building
def _on_meta(what: str, build: Callable[[], nn.Module], notes: List[str]) -> nn.Module:
    try:
        with META:
            return build()
    except Exception as exc:  # a family that loads files or computes on data at construction
        notes.append(f"{what}: built on the CPU with random weights and moved to meta "
                     f"(meta construction failed: {type(exc).__name__}: {str(exc)[:120]})")
    try:
        return build().to(META)
    except Exception as exc:
        raise PlanError(f"cannot build {what} to measure it: {type(exc).__name__}: {exc}") from exc


def _weights_of(module: nn.Module, skip: Tuple[nn.Module, ...] = ()) -> Weights:
    """Quantizable linears (exactly ``nn.Linear``, as ``quantize_teacher`` swaps them) and the rest,
    leaving out the subtrees in ``skip``."""
    skipped = {id(m) for s in skip for m in s.modules()}
    w = Weights()
    for m in module.modules():
        if id(m) in skipped:
            continue
        own = [t for t in list(m._parameters.values()) + list(m._buffers.values()) if t is not None]
        if type(m) is nn.Linear:
            w.linears.append((m.out_features, m.in_features, m.bias is not None))
            own = [t for t in m._buffers.values() if t is not None]
        for t in own:
            if t.is_floating_point():
                w.float_numel += t.numel()
            else:
                w.fixed_bytes += t.numel() * t.element_size()
    return w


def frozen_weights(student: nn.Module) -> Weights:
    """The student's frozen tensors: the base's linears (what ``quantize_teacher`` swaps when the
    base has 8/4 bits; the adapter's own LoRA linears train) and the rest, buffers included."""
    w = Weights()
    for m in student.modules():
        own = [p for p in m._parameters.values() if p is not None and not p.requires_grad]
        if type(m) is nn.Linear and not m.weight.requires_grad:
            w.linears.append((m.out_features, m.in_features, m.bias is not None))
            own = []
        for t in own + [b for b in m._buffers.values() if b is not None]:
            if t.is_floating_point():
                w.float_numel += t.numel()
            else:
                w.fixed_bytes += t.numel() * t.element_size()
    return w


def teacher_weights(teacher: nn.Module) -> Tuple[Weights, List[Weights]]:
    """(outside the block list, per block) weights of a teacher."""
    blocks = [block for _, block in find_blocks(teacher)[1]]
    return _weights_of(teacher, skip=tuple(blocks)), [_weights_of(b) for b in blocks]


def build_meta_models(recipe: Recipe, notes: List[str]):
    """(InheritedModel, {name: teacher}) on meta; the adapter-mode base teacher is the student."""
    teachers: Dict[str, Teacher] = {}
    for t in recipe.teachers:
        if recipe.inside_student(t):
            continue
        if is_graph_teacher(t.family):
            teachers[t.name] = build_teacher(t).freeze()
            notes.append(f"teacher {t.name!r} ({t.family}): runs in onnxruntime, outside torch; its memory and time "
                         "are not counted")
        else:
            cfg = dataclasses.replace(t, weights="none")
            teachers[t.name] = _on_meta(f"teacher {t.name!r} ({t.family})", lambda cfg=cfg: build_teacher(cfg), notes)
    backbone_cfg = dataclasses.replace(student_backbone_config(recipe, with_weights=False), weights="none")

    def student():
        body = build_teacher(backbone_cfg)
        return Student(body, recipe.student)

    st = _on_meta(f"the student ({backbone_cfg.family})", student, notes)
    specs = teacher_specs(recipe, st, teachers)
    model = _on_meta("heads and normalisers", lambda: build_model(recipe, st, specs), notes)
    return model, teachers


# ----------------------------------------------------------------------------- measuring
def make_loss_fn(recipe: Recipe, backend: str):
    """``loss_fn(hidden, linear, target)`` as the trainer's ``FusedLinearDistill`` computes it,
    runnable on meta: the eager reference, or the fused kernel's host code (on meta it allocates
    as on a GPU and skips the Triton launches)."""
    lo = recipe.loss
    if backend == "triton":
        from lowres_kd_kernels.linear_distill import fused_linear_distill_triton as loss  # imports triton: only when asked for
    else:
        loss = fused_linear_distill_reference

    def loss_fn(hidden, linear, target):
        return loss(hidden, linear.weight, linear.bias, target, alpha=lo.alpha, beta=lo.beta, distance=lo.distance)

    return loss_fn


def _measure_step(model, recipe: Recipe, specs, batch: int, autocast, loss_fn) -> Tuple[Dict[str, int], float]:
    size = recipe.data.image_size
    images = torch.empty(batch, 3, size, size, device=META)
    targets = {n: Features(torch.empty(batch, s.global_dim, device=META),
                           torch.empty(batch, s.dense_dim, *s.grid, device=META)) for n, s in specs.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    live = LiveBytes()
    lo = recipe.loss
    with live:
        with emulate_device(autocast):
            live.phase = "student"
            feats = model.student(images)
            live.phase = "heads"
            hidden = {}
            for name, heads in model.heads.items():
                hidden[name] = (heads.global_.trunk(feats.global_), heads.dense.hidden(feats.dense, heads.grid))
        live.phase = "loss"
        total = 0
        for t in recipe.teachers:  # outside the emulation: the loss computes in fp32, autocast off
            heads, target = model.heads[t.name], targets[t.name]
            g = loss_fn(hidden[t.name][0], heads.global_.out, target.global_)
            d = loss_fn(hidden[t.name][1], heads.dense.out, dense_rows(target.dense, heads.grid))
            total = total + recipe.teacher_weight(t) * (lo.global_weight * g + lo.dense_weight * d)
        del hidden, feats, g, d
        kept = live.by_phase()  # what the forward keeps for backward, by the part that made it
        forward_peak = live.peak
        live.phase = "backward"
        live.reset_peak()
        with emulate_device(autocast):  # checkpointed segments recompute here
            (total / recipe.train.grad_accum).backward()
        grads = live.made_before_peak([p.grad for p in trainable if p.grad is not None])
    for p in trainable:
        p.grad = None
    parts = {k: kept.get(k, 0) for k in ("student", "heads", "loss")}
    parts["forward_working"] = forward_peak - sum(kept.values())
    parts["backward_working"] = live.peak - sum(kept.values()) - grads
    parts["grads_at_peak"] = grads
    return parts, live.flops / batch


def _measure_forward(fn, image_size: int, batch: int, autocast) -> Tuple[int, float]:
    images = torch.empty(batch, 3, image_size, image_size, device=META)
    live = LiveBytes()
    with torch.no_grad(), live, emulate_device(autocast):
        fn(images)
    return live.peak, live.flops / batch


def resolve_loss_backend(recipe: Recipe, device_type: str) -> str:
    """The backend ``FusedLinearDistill`` will pick: ``auto`` is the kernel on CUDA when Triton imports."""
    kernels = recipe.loss.kernels
    if kernels == "auto":
        return "triton" if device_type == "cuda" and triton_import_error() is None else "torch"
    return kernels


_CACHE: "OrderedDict[str, RecipeProfile]" = OrderedDict()
_CACHE_SIZE = 4


def _profile_key(recipe: Recipe, device_type: str, engine: str) -> str:
    """The recipe without what the measurements do not depend on: the settings the planner changes
    (batch, accumulation, checkpointing, teacher bits and offload, optimizer, ZeRO) and bookkeeping."""
    d = recipe.to_dict()
    for key in ("name", "output_dir", "memory", "optim", "deepspeed", "plan", "probe", "cache"):
        d.pop(key)
    d["train"] = {"bf16": d["train"]["bf16"]}
    for key in ("grad_checkpointing", "weights"):
        d["student"].pop(key)
    for t in d["teachers"]:
        for key in ("bits", "offload", "min_fidelity", "weight", "weights"):
            t.pop(key)
    return json.dumps([d, device_type, engine], sort_keys=True)


def profile_recipe(recipe: Recipe, device_type: str, engine: str) -> RecipeProfile:
    """Measure ``recipe``'s models on meta for ``device_type`` and ``engine`` (see the module
    docstring). The last few profiles are kept: planning variants of one recipe measures once."""
    key = _profile_key(recipe, device_type, engine)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    prof = _measure_recipe(recipe, device_type, engine)
    _CACHE[key] = prof
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return prof


def _measure_recipe(recipe: Recipe, device_type: str, engine: str) -> RecipeProfile:
    notes: List[str] = []
    model, teachers = build_meta_models(recipe, notes)
    model.train()
    bf16 = device_type == "cuda" and recipe.train.bf16
    autocast = torch.bfloat16 if bf16 else None
    if engine == "deepspeed" and bf16:  # DeepSpeed casts the modules it manages
        model.student.to(torch.bfloat16)
        model.heads.to(torch.bfloat16)
    for t in teachers.values():
        t.eval()
        if bf16:
            t.to(torch.bfloat16)
    backend = resolve_loss_backend(recipe, device_type)
    loss_fn = make_loss_fn(recipe, backend)
    specs = model.specs
    student_params = list(model.student.parameters())
    trained = nn.ModuleList([model.student, model.heads])
    prof = RecipeProfile(
        device_type=device_type, engine=engine, bf16=bf16, loss_backend=backend,
        trainable=[p.numel() for p in student_params if p.requires_grad],
        heads=[p.numel() for p in model.heads.parameters()],
        frozen=frozen_weights(model.student),
        largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in trained.modules()),
        normaliser_bytes=_normaliser_bytes(model),
        teachers=[], notes=notes,
        measure_step=lambda ckpt, batch: _step_profile(model, recipe, specs, ckpt, batch, autocast, loss_fn))
    from_cache = recipe.teachers_from == "cache"
    size = recipe.data.image_size
    for t in recipe.teachers:
        spec = specs[t.name]
        target = spec.global_dim + spec.dense_dim * spec.grid[0] * spec.grid[1]
        graph = is_graph_teacher(t.family)
        if t.name in teachers and not from_cache and not graph:
            outside, blocks = teacher_weights(teachers[t.name])
        else:  # no teacher in torch memory: the cache holds the targets, the student is the base, or a graph
            outside, blocks = Weights(), []
        fn = teachers[t.name] if t.name in teachers else model.student.base_features
        prof.teachers.append(TeacherProfile(
            t.name, outside, blocks, target, is_student=t.name not in teachers, runs=not from_cache and not graph,
            measure=lambda b, fn=fn: _measure_forward(fn, size, b, autocast)))
    if from_cache:
        notes.append("teachers_from: cache: no teacher runs; targets come from the cache")
    return prof


def _step_profile(model, recipe, specs, checkpointing: bool, batch: int, autocast, loss_fn) -> StepProfile:
    model.student.body.set_grad_checkpointing(checkpointing)
    parts, flops = _measure_step(model, recipe, specs, batch, autocast, loss_fn)
    return StepProfile(flops_per_image=flops, **parts)


def _normaliser_bytes(model) -> int:
    """Normaliser buffers (fp32: mean, transform, inverse). The float64 calibration statistics
    are freed once the normalisers are fitted, before the first step."""
    return sum(b.numel() * b.element_size() for mods in (model.norm_global, model.norm_dense) for b in mods.buffers())


__all__ = ["PlanError", "RecipeProfile", "StepProfile", "TeacherProfile", "build_meta_models",
           "profile_recipe", "resolve_loss_backend", "teacher_weights"]
