"""The memory plan: per-component estimate of one GPU, and the settings that make it fit (DESIGN §3).

``plan_recipe(recipe, gpu_mem_bytes, world_size, device_type)`` measures the recipe's models
(``profile``), estimates every component for the recipe as written, and, while the estimate does
not fit ``gpu_mem * (1 - plan.reserve)``, tries these changes in this order, cheapest in speed
first, keeping each one that lowers the estimate and stopping as soon as it fits:

1. a smaller micro-batch with more accumulation (the effective batch, batch_size x grad_accum,
   is kept: each time the largest divisor of it at most half the last), down to 4 (or the
   recipe's own if smaller);
2. gradient checkpointing of the student (recomputes its forward in backward: ~30 % more compute);
3. teachers to 8 bits, largest first (not the base teacher in adapter mode: it is the student
   itself, and quantizing it changes what trains; a recipe may set its bits, and the plan counts
   them); then 4. to 4 bits (more fidelity risk: the trainer's fidelity check still applies);
5. teacher offload, largest resident first (blocks stream from CPU memory every forward);
6. DeepSpeed ZeRO stage 1, 2, 3, each kept if it lowers the estimate (partitioning pays off
   with several ranks; at one rank stage 1 avoids stage 2's reduction bucket);
7. DeepSpeed optimizer offload to CPU (CPU Adam; the update moves over PCIe);
8. DeepSpeed parameter offload to CPU (ZeRO-3; every layer's weights move over PCIe);
9. 8-bit AdamW on the torch engine (bitsandbytes; about 2 bytes of state a parameter, not 8);
10. the micro-batch further down to 1.

Once it fits, each earlier change the later ones made unnecessary is undone (most expensive
first), and the micro-batch grows back to the largest of the recipe's and its halvings that still
fits with the other changes. Changes the recipe's validation refuses, or
that do not lower the estimate, are skipped. When nothing fits, ``plan.fits`` is False and
``plan.error`` names the largest components.

Totals: the device always holds the weights, optimizer state, engine buffers, normalisers and
the CUDA context; on top, the largest of three moments that do not overlap: the teacher forward
(the largest teacher's ``no_grad`` peak, with the targets), the student step (the targets,
activations kept for backward, head activations, loss buffers, and the working memory above them
at the step's peak) and the update (gradients and the optimizer's temporaries). Gradients are
always there when a step accumulates several micro-batches or under DeepSpeed; with the torch
engine and one micro-batch a step they exist from the backward to the update only (the step's
working memory counts those its backward has made by its peak). The allocator reserve is
``plan.reserve`` of the budget. Throughput is a rough FLOP count at an
assumed device speed (stated in the table), plus the PCIe copies that offloading adds.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ..config import Recipe, RecipeError, apply_overrides, recipe_from_dict
from ..engine_config import deepspeed_config, resolve_engine_name
from ..teachers import is_graph_teacher
from ..units import format_bytes
from .arithmetic import EngineSettings, engine_state, teacher_weight_bytes
from .profile import RecipeProfile, profile_recipe

CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context + cuBLAS/cuDNN handles and workspaces; see CUDA_CONTEXT_WHY
CUDA_CONTEXT_WHY = ("CUDA context, kernels and cuBLAS/cuDNN workspaces: ~300-500 MiB on Ampere/Hopper with torch 2.x "
                    "(lazy module loading); not counted by max_memory_allocated, it is by the driver")
DEFAULT_TFLOPS = {"cuda": 100.0, "cpu": 0.2}  # dense bf16 (an RTX 4090 has ~165, a 3090 ~71); CPU: fp32, 2-4 cores
EFFICIENCY = 0.3  # fraction of peak a mixed conv/attention training step reaches
PCIE_BYTES_PER_S = 16e9  # host <-> device copies (PCIe 4.0 x16, pinned memory, in practice)
MIN_FAST_MICRO_BATCH = 4
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": int(5e8), "stage3_prefetch_bucket_size": int(5e7)}  # DeepSpeed 0.19


@dataclass
class Component:
    name: str
    device: int  # bytes on the training device
    cpu: int  # bytes in CPU memory (offloaded)
    phase: str  # always | targets | teachers | step | optimizer | reserve
    detail: str = ""


@dataclass
class Estimate:
    components: List[Component]
    settings: Dict[str, Any]
    images_per_s: float
    flops_per_image: float

    def _sum(self, phase: str, attr: str = "device") -> int:
        return sum(getattr(c, attr) for c in self.components if c.phase == phase)

    @property
    def device_total(self) -> int:
        """Peak bytes on the device, the reserve included: what is always there, plus the largest
        of the teacher forward and the student step (both with the targets) and the update."""
        targets = self._sum("targets")
        return (self._sum("always") + self._sum("reserve")
                + max(targets + self._sum("teachers"), targets + self._sum("step"), self._sum("optimizer")))

    @property
    def cpu_total(self) -> int:
        return sum(c.cpu for c in self.components)

    def largest(self, n: int = 3) -> List[Component]:
        return sorted((c for c in self.components if c.phase != "reserve"), key=lambda c: -c.device)[:n]


# ----------------------------------------------------------------------------- estimate
def _optimizer_temporaries(prof: RecipeProfile, s: EngineSettings) -> Tuple[int, str]:
    """torch AdamW's update: on CUDA the multi-tensor (foreach) kernel makes the square roots of
    all second moments at once (4 bytes a parameter); on CPU it goes tensor by tensor (the largest
    one). bitsandbytes' 8-bit update works in place."""
    if s.optim_name == "adamw8bit":
        return 0, "8-bit AdamW updates in place"
    if prof.device_type == "cuda":
        return 4 * (sum(prof.trainable) + sum(prof.heads)), "foreach AdamW: sqrt of every second moment, fp32"
    return 4 * max(prof.trainable + prof.heads), "AdamW, one tensor at a time: the largest, fp32"


def _deepspeed_buffers(recipe: Recipe, bf16: bool, device_type: str) -> Tuple[int, bool, int]:
    """(reduce bucket, overlap_comm, prefetch bucket) of the DeepSpeed config the trainer writes."""
    zero = deepspeed_config(recipe, bf16, device_type == "cuda").get("zero_optimization", {})
    stage = recipe.deepspeed.zero_stage
    return (int(zero.get("reduce_bucket_size", DEEPSPEED_DEFAULTS["reduce_bucket_size"])),
            bool(zero.get("overlap_comm", stage == 3)),  # DeepSpeed turns it on by default at stage 3
            int(zero.get("stage3_prefetch_bucket_size", DEEPSPEED_DEFAULTS["stage3_prefetch_bucket_size"])))


def engine_settings(recipe: Recipe, prof: RecipeProfile, world_size: int) -> EngineSettings:
    ds = recipe.deepspeed
    settings = EngineSettings(engine=prof.engine, bf16=prof.bf16, world_size=world_size, optim_name=recipe.optim.name)
    if prof.engine == "deepspeed":
        bucket, overlap, prefetch = _deepspeed_buffers(recipe, prof.bf16, prof.device_type)
        settings.zero_stage = ds.zero_stage
        settings.offload_optimizer = ds.offload_optimizer != "none"
        settings.offload_param = ds.offload_param != "none"
        settings.optim_name = "adamw" if settings.offload_optimizer else recipe.optim.name  # DeepSpeed's CPU Adam
        settings.reduce_bucket, settings.overlap_comm, settings.prefetch_bucket = bucket, overlap, prefetch
    return settings


def estimate(recipe: Recipe, prof: RecipeProfile, gpu_mem: int, world_size: int = 1,
             tflops: Optional[float] = None) -> Estimate:
    """Every component of ``recipe`` on one device, from the measured profile."""
    batch = recipe.train.batch_size
    ckpt = recipe.student.grad_checkpointing
    step = prof.step(ckpt, batch)
    cuda = prof.device_type == "cuda"
    teacher_dtype = 2 if prof.bf16 else 4
    comps: List[Component] = []
    offload_bytes = 0
    entries = {t.name: (i, t) for i, t in enumerate(recipe.teachers)}
    for tp in prof.teachers:
        i, t = entries[tp.name]
        if tp.is_student or not tp.runs:
            why = "the student's own weights, adapter disabled" if tp.is_student else "not loaded: targets from the cache"
            comps.append(Component(f"teacher weights: {tp.name}", 0, 0, "always", why))
            continue
        dev, cpu = teacher_weight_bytes(tp.outside, tp.blocks, t.bits, teacher_dtype, t.offload)
        offload_bytes += cpu
        what = f"{t.bits}-bit" + (", offloaded: 2 blocks staged, the rest in CPU memory" if t.offload else "")
        numel = tp.outside.numel + sum(b.numel for b in tp.blocks)
        comps.append(Component(f"teacher weights: {tp.name}", dev, cpu, "always", f"{numel / 1e6:.1f}M params, {what}"))
    live = [tp for tp in prof.teachers if tp.runs]
    if live:
        biggest = max(live, key=lambda tp: tp.forward_peak(batch))
        comps.append(Component("teacher forward (no-grad peak)", biggest.forward_peak(batch), 0, "teachers",
                               f"largest: {biggest.name}; teachers run one after another"))
    comps.append(Component("teacher targets", 4 * batch * sum(tp.target_numel for tp in prof.teachers), 0, "targets",
                           "normalised global + dense features, fp32, all teachers"))

    s = engine_settings(recipe, prof, world_size)
    student = engine_state(prof.trainable, prof.frozen_numel, prof.largest_layer, s)
    heads = engine_state(prof.heads, 0, prof.largest_layer, s)
    both = engine_state(prof.trainable + prof.heads, prof.frozen_numel, prof.largest_layer, s)
    if prof.frozen_numel:
        dev, cpu, how = student["frozen"]
        dev += prof.frozen_fixed_bytes
        bits = recipe.student_base_bits
        if bits < 16:  # bitsandbytes linears under the adapter (the torch engine: config refuses DeepSpeed)
            dev, how = prof.frozen.nbytes(bits, 4), f"{bits}-bit linears, the rest fp32"
        comps.append(Component("student frozen weights", dev, cpu, "always",
                               f"{prof.frozen_numel / 1e6:.1f}M, {how} (the base, in adapter mode)"))
    n_student, n_heads = sum(prof.trainable), sum(prof.heads)
    comps.append(Component("student trainable params", *student["params"][:2], "always",
                           f"{n_student / 1e6:.2f}M, {student['params'][2]}"))
    comps.append(Component("heads params", *heads["params"][:2], "always",
                           f"{n_heads / 1e6:.2f}M, {heads['params'][2]}; one global + one dense MLP per teacher"))
    # the torch engine frees the gradients after each update: with one micro-batch a step they exist
    # from the backward to the update only (the backward's working memory counts those made by its peak)
    fresh_grads = prof.engine == "torch" and recipe.train.grad_accum == 1
    for key, label in (("grads", "gradients"), ("optimizer", "optimizer state")):
        dev, cpu, how = both[key]
        split = f"student {format_bytes(student[key][0] + student[key][1])} + heads {format_bytes(heads[key][0] + heads[key][1])}"
        comps.append(Component(label, dev, cpu, "optimizer" if key == "grads" and fresh_grads else "always",
                               f"{how}; {split}"))
    if prof.engine == "torch":
        temp, how = _optimizer_temporaries(prof, s)
        comps.append(Component("optimizer step temporaries", temp, 0, "optimizer", how))
    comps.append(Component("normalisers", prof.normaliser_bytes, 0, "always",
                           "fp32 mean + transform + inverse (calibration statistics are freed after the fit)"))
    dev, cpu, how = both["buffers"]
    comps.append(Component(f"engine buffers ({prof.engine})", dev, cpu, "always", how))
    act = "checkpointed: segment inputs" if ckpt else "kept for backward"
    comps.append(Component("student activations", step.student, 0, "step",
                           f"{act}, batch {batch}"))
    comps.append(Component("head activations", step.heads, 0, "step", "trunks (LayerNorm, Linear, GELU)"))
    loss_how = ("fused kernel: kept gradients + one row chunk + a small fp32 table" if prof.loss_backend == "triton"
                else "eager: the (rows x C) projection in fp32 and its temporaries")
    comps.append(Component("loss buffers", step.loss, 0, "step", loss_how))
    comps.append(Component("working memory", step.working(fresh_grads), 0, "step",
                           "peak of the step above the kept activations"
                           + (", gradients made by then included" if fresh_grads else "")))
    if cuda:
        comps.append(Component("CUDA context", CUDA_CONTEXT_BYTES, 0, "always", CUDA_CONTEXT_WHY))
    reserve = int(gpu_mem * recipe.plan.reserve)
    comps.append(Component("allocator reserve", reserve, 0, "reserve", f"plan.reserve = {recipe.plan.reserve:g} of the budget"))

    flops = step.flops_per_image + sum(tp.flops_per_image(batch) for tp in prof.teachers)
    speed = (tflops or DEFAULT_TFLOPS[prof.device_type]) * 1e12 * EFFICIENCY
    seconds_per_image = flops / speed
    seconds_per_image += offload_bytes / PCIE_BYTES_PER_S / batch  # teacher blocks, every micro-batch
    images_per_step = batch * recipe.train.grad_accum
    if s.offload_optimizer:  # gradients down (fp32), parameters up (bf16), per optimizer step
        seconds_per_image += 6 * (n_student + n_heads) / max(1, world_size) / PCIE_BYTES_PER_S / images_per_step
    if s.offload_param:  # every layer's weights up, forward and backward
        seconds_per_image += 2 * 2 * (n_student + prof.frozen_numel) / PCIE_BYTES_PER_S / batch
    settings = {"engine": prof.engine, "world_size": world_size, "batch_size": batch, "grad_accum": recipe.train.grad_accum,
                "grad_checkpointing": ckpt, "optim": s.optim_name,
                "teachers": {t.name: {"bits": t.bits, "offload": t.offload} for t in recipe.teachers},
                "loss_kernel": prof.loss_backend}
    if prof.engine == "deepspeed":
        settings["deepspeed"] = {"zero_stage": s.zero_stage, "offload_optimizer": recipe.deepspeed.offload_optimizer,
                                 "offload_param": recipe.deepspeed.offload_param}
    return Estimate(comps, settings, 1.0 / seconds_per_image if seconds_per_image else 0.0, flops)


# ----------------------------------------------------------------------------- choosing
def _halvings(effective: int, start: int) -> List[int]:
    """``start``, then repeatedly the largest divisor of ``effective`` at most half the last, down to 1:
    the micro-batch sizes the planner considers (each one is measured, so only about log2 of them)."""
    sizes = [start]
    while sizes[-1] > 1:
        sizes.append(max(d for d in range(1, sizes[-1] // 2 + 1) if effective % d == 0))
    return sizes


class _Search:
    """The current recipe (original + accepted changes) and its estimate."""

    def __init__(self, recipe: Recipe, prof: RecipeProfile, gpu_mem: int, world_size: int, tflops):
        self.original, self.prof, self.gpu_mem, self.world_size, self.tflops = recipe, prof, gpu_mem, world_size, tflops
        self.changes: Dict[str, Any] = {}
        self.recipe = recipe
        self.current = self._estimate(recipe)
        self.trail: List[Tuple[str, int]] = [("as written", self.current.device_total)]
        self.accepted: List[Tuple[str, Dict[str, Any]]] = []

    def _estimate(self, recipe: Recipe) -> Estimate:
        return estimate(recipe, self.prof, self.gpu_mem, self.world_size, self.tflops)

    @property
    def fits(self) -> bool:
        return self.current.device_total <= self.gpu_mem

    def candidate(self, overrides: Dict[str, Any]) -> Optional[Tuple[Recipe, Estimate]]:
        try:
            recipe = apply_changes(self.original, {**self.changes, **overrides})
        except RecipeError:
            return None
        return recipe, self._estimate(recipe)

    def accept(self, label: str, overrides: Dict[str, Any], recipe: Recipe, est: Estimate) -> None:
        self.changes.update(overrides)
        self.changes = {k: v for k, v in self.changes.items() if _value_at(self.original, k) != v}
        self.recipe, self.current = recipe, est
        self.trail.append((label, est.device_total))
        self.accepted.append((label, overrides))

    def drop(self, label: str, keys) -> bool:
        """Undo the change to ``keys`` if the recipe still fits without it."""
        changes = {k: v for k, v in self.changes.items() if k not in keys}
        try:
            recipe = apply_changes(self.original, changes)
        except RecipeError:
            return False
        est = self._estimate(recipe)
        if est.device_total > self.gpu_mem:
            return False
        self.changes, self.recipe, self.current = changes, recipe, est
        self.trail.append((f"without {label}", est.device_total))
        return True

    def try_change(self, label: str, overrides: Dict[str, Any]) -> bool:
        found = self.candidate(overrides)
        if found is None or found[1].device_total >= self.current.device_total:
            return False
        self.accept(label, overrides, *found)
        return True


def _value_at(recipe: Recipe, key: str):
    node: Any = recipe.to_dict()
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def apply_changes(recipe: Recipe, changes: Dict[str, Any]) -> Recipe:
    """``recipe`` with dotted-key ``changes``, validated as any recipe is."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in changes.items()]
    return recipe_from_dict(apply_overrides(recipe.to_dict(), overrides), f"recipe {recipe.name!r} with the plan's changes")


def _batch_moves(search: _Search, floor: int) -> Iterator[Tuple[str, Dict[str, Any]]]:
    t = search.recipe.train
    effective = t.batch_size * t.grad_accum
    for b in _halvings(effective, t.batch_size)[1:]:
        if b < floor:
            return
        yield f"micro-batch {b} x {effective // b}", {"train.batch_size": b, "train.grad_accum": effective // b}


def _checkpointing(search: _Search):
    if not search.recipe.student.grad_checkpointing:
        yield "gradient checkpointing", {"student.grad_checkpointing": True}


def _teacher_order(search: _Search) -> List[int]:
    """Teacher indices, largest weights on the device first."""
    est = {c.name: c.device for c in search.current.components}
    return sorted(range(len(search.recipe.teachers)),
                  key=lambda i: -est.get(f"teacher weights: {search.recipe.teachers[i].name}", 0))


def _teacher_bits(bits: int):
    def moves(search: _Search):
        if importlib.util.find_spec("bitsandbytes") is None:
            return
        for i in _teacher_order(search):
            t = search.recipe.teachers[i]
            if t.bits > bits and not is_graph_teacher(t.family) and not search.recipe.inside_student(t):
                yield f"teacher {t.name} to {bits} bits", {f"teachers.{i}.bits": bits}
    return moves


def _teacher_offload(search: _Search):
    for i in _teacher_order(search):
        t = search.recipe.teachers[i]
        if not t.offload and not is_graph_teacher(t.family) and not search.recipe.inside_student(t):
            yield f"teacher {t.name} offloaded", {f"teachers.{i}.offload": True}


def _zero_stages(search: _Search):
    if search.prof.engine == "deepspeed":
        for stage in (1, 2, 3):  # kept only where it lowers the estimate: at world size 1 a stage above 1
            if search.recipe.deepspeed.zero_stage != stage:  # partitions nothing and adds a reduction bucket
                yield f"ZeRO stage {stage}", {"deepspeed.zero_stage": stage}


def _offload_optimizer(search: _Search):
    ds = search.recipe.deepspeed
    if search.prof.engine == "deepspeed" and ds.offload_optimizer == "none":
        change: Dict[str, Any] = {"deepspeed.offload_optimizer": "cpu"}
        if ds.zero_stage == 0:
            change["deepspeed.zero_stage"] = 1
        yield "optimizer offload to CPU", change


def _offload_param(search: _Search):
    ds = search.recipe.deepspeed
    if search.prof.engine == "deepspeed" and ds.offload_param == "none":
        yield "parameter offload to CPU (ZeRO-3)", {"deepspeed.offload_param": "cpu", "deepspeed.zero_stage": 3}


def _adamw8bit(search: _Search):
    if (search.prof.engine == "torch" and search.recipe.optim.name != "adamw8bit"
            and importlib.util.find_spec("bitsandbytes") is not None):
        yield "8-bit AdamW", {"optim.name": "adamw8bit"}


MOVES: List[Callable[[_Search], Iterator[Tuple[str, Dict[str, Any]]]]] = [
    lambda s: _batch_moves(s, min(MIN_FAST_MICRO_BATCH, s.original.train.batch_size)),
    _checkpointing, _teacher_bits(8), _teacher_bits(4), _teacher_offload, _zero_stages, _offload_optimizer,
    _offload_param, _adamw8bit, lambda s: _batch_moves(s, 1),
]


def _prune(search: _Search) -> None:
    """Undo, most expensive first, each change the fitting recipe no longer needs (an early one the
    later ones made unnecessary); micro-batch changes are left to ``_grow_batch``."""
    for label, overrides in reversed(search.accepted[:-1]):
        if "train.batch_size" not in overrides and all(k in search.changes for k in overrides):
            search.drop(label, set(overrides))


def _grow_batch(search: _Search) -> None:
    """The largest micro-batch (of the recipe's and its halvings) that fits."""
    t, original = search.recipe.train, search.original.train.batch_size
    effective = t.batch_size * t.grad_accum
    for b in _halvings(effective, original):
        if b <= t.batch_size:
            return
        found = search.candidate({"train.batch_size": b, "train.grad_accum": effective // b})
        if found is not None and found[1].device_total <= search.gpu_mem:
            search.accept(f"micro-batch back to {b} x {effective // b}", {"train.batch_size": b,
                          "train.grad_accum": effective // b}, *found)
            return


@dataclass
class Plan:
    """What ``plan_recipe`` found. ``changes``: dotted recipe keys -> new values (empty when the
    recipe fits as written); ``apply(recipe)``: the recipe with them, validated."""

    recipe_name: str
    device_type: str
    engine: str
    world_size: int
    gpu_mem: int
    reserve: float
    fits: bool
    changes: Dict[str, Any]
    estimate: Estimate
    original: Estimate
    trail: List[Tuple[str, int]]
    tflops: float
    error: str = ""
    notes: List[str] = field(default_factory=list)

    def apply(self, recipe: Recipe) -> Recipe:
        return apply_changes(recipe, self.changes)

    @property
    def device_total_bytes(self) -> int:
        """The planned peak on one device, the reserve included."""
        return self.estimate.device_total

    @property
    def cpu_total_bytes(self) -> int:
        return self.estimate.cpu_total

    @property
    def images_per_s(self) -> float:
        return self.estimate.images_per_s

    @property
    def assumptions(self) -> List[str]:
        a = [f"throughput: {self.tflops:g} TFLOPS peak at {EFFICIENCY:.0%} efficiency "
             f"(--gpu-tflops), PCIe {PCIE_BYTES_PER_S / 1e9:g} GB/s for offloaded copies",
             "activations and FLOPs measured on the meta device at each micro-batch size considered"]
        if self.device_type == "cuda":
            a += [f"CUDA context {format_bytes(CUDA_CONTEXT_BYTES)}: {CUDA_CONTEXT_WHY}",
                  "bf16 autocast emulated on meta (linear/conv/attention in bf16, norms/softmax/losses in fp32); "
                  "unquantized teacher weights in bf16"]
        return a

    def as_dict(self) -> dict:
        def comps(e: Estimate):
            return [{"name": c.name, "device_bytes": c.device, "cpu_bytes": c.cpu, "phase": c.phase, "detail": c.detail}
                    for c in e.components]

        return {"recipe": self.recipe_name, "device_type": self.device_type, "engine": self.engine,
                "world_size": self.world_size, "gpu_mem_bytes": self.gpu_mem, "reserve": self.reserve,
                "fits": self.fits, "changes": self.changes, "error": self.error,
                "device_total_bytes": self.device_total_bytes, "cpu_total_bytes": self.cpu_total_bytes,
                "original_device_total_bytes": self.original.device_total,
                "images_per_s": self.images_per_s, "flops_per_image": self.estimate.flops_per_image,
                "settings": self.estimate.settings, "components": comps(self.estimate),
                "trail": [{"step": label, "device_total_bytes": total} for label, total in self.trail],
                "assumptions": self.assumptions, "notes": self.notes}

    def table(self) -> str:
        """Markdown: the settings, one row per component, totals, changes, assumptions."""
        e, dev = self.estimate, self.device_type
        st = e.settings
        lines = [f"### Memory plan: {self.recipe_name} on {dev} (budget {format_bytes(self.gpu_mem)}, "
                 f"engine {self.engine}, world size {self.world_size})", "",
                 f"Settings: micro-batch {st['batch_size']} x {st['grad_accum']} accumulation, checkpointing "
                 f"{'on' if st['grad_checkpointing'] else 'off'}, optimizer {st['optim']}, loss {st['loss_kernel']}"
                 + (f", ZeRO {st['deepspeed']['zero_stage']}, offload optimizer {st['deepspeed']['offload_optimizer']}, "
                    f"params {st['deepspeed']['offload_param']}" if "deepspeed" in st else ""), "",
                 f"| component | on {dev} | in CPU memory | when | detail |", "|---|---:|---:|---|---|"]
        when = {"always": "always", "targets": "teacher forward + student step", "teachers": "teacher forward",
                "step": "student step", "optimizer": "backward to update", "reserve": ""}
        for c in e.components:
            lines.append(f"| {c.name} | {format_bytes(c.device)} | {format_bytes(c.cpu) if c.cpu else '-'} | "
                         f"{when[c.phase]} | {c.detail} |")
        lines.append(f"| **total (peak)** | **{format_bytes(e.device_total)}** | **{format_bytes(e.cpu_total)}** | | "
                     "always + reserve + the largest of: targets + teacher forward, targets + student step, update |")
        lines.append("")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"**{verdict}**: {format_bytes(e.device_total)} of {format_bytes(self.gpu_mem)} "
                     f"(as written: {format_bytes(self.original.device_total)}); about {e.images_per_s:,.1f} images/s "
                     f"({e.flops_per_image / 1e9:.2f} GFLOP an image).")
        if self.changes:
            lines.append("")
            lines.append("Changes: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in self.changes.items()))
            lines.append("Tried in order: " + "; ".join(f"{label} ({format_bytes(total)})" for label, total in self.trail))
        if self.error:
            lines += ["", f"Error: {self.error}"]
        lines += ["", "Assumptions: " + "; ".join(self.assumptions) + "."]
        if self.notes:
            lines += ["", "Notes: " + "; ".join(self.notes) + "."]
        return "\n".join(lines)


def plan_recipe(recipe: Recipe, gpu_mem_bytes: int, world_size: int = 1, device_type: str = "cuda",
                tflops: Optional[float] = None) -> Plan:
    """Estimate ``recipe`` on a device of ``gpu_mem_bytes`` and pick settings that fit (module docstring).

    Example::

        plan = plan_recipe(recipe, parse_bytes("12GiB"), world_size=1, device_type="cuda")
        if plan.fits:
            recipe = plan.apply(recipe)      # e.g. {"train.batch_size": 4, "train.grad_accum": 4}
        print(plan.table())
    """
    if device_type not in DEFAULT_TFLOPS:
        raise ValueError(f"device_type must be one of {', '.join(DEFAULT_TFLOPS)}, got {device_type!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    engine = resolve_engine_name(recipe, device_type)
    prof = profile_recipe(recipe, device_type, engine)
    search = _Search(recipe, prof, int(gpu_mem_bytes), world_size, tflops)
    original = search.current
    for move in MOVES:
        for label, overrides in move(search):
            if search.fits:
                break
            search.try_change(label, overrides)
    if search.fits:
        _prune(search)
        _grow_batch(search)
    error = ""
    if not search.fits:
        big = ", ".join(f"{c.name} {format_bytes(c.device)}" for c in search.current.largest())
        error = (f"nothing fits in {format_bytes(gpu_mem_bytes)}: with every change the planner tries the estimate is "
                 f"{format_bytes(search.current.device_total)}; the largest components: {big}")
    return Plan(recipe.name, device_type, engine, world_size, int(gpu_mem_bytes), recipe.plan.reserve, search.fits,
                dict(search.changes), search.current, original, search.trail,
                tflops or DEFAULT_TFLOPS[device_type], error, list(prof.notes))
