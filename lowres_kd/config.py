"""Recipes: typed dataclasses, the only place defaults live; YAML loading with validation.

``load_recipe(path, overrides)`` reads YAML with ``yaml.safe_load``, applies ``--set a.b=value``
overrides, refuses unknown keys, wrong types and impossible values, and reports every problem at
once, each naming its key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml


class RecipeError(ValueError):
    """A recipe that cannot run; the message lists every problem, one per line."""


@dataclass
class TeacherConfig:
    name: str  # unique name in this run, used in logs and outputs
    family: str  # registered teacher family (lowres-kd teachers lists them)
    weights: str = "shipped"  # shipped | hub | none | path to .safetensors/.pt
    model: str = ""  # model name inside the family (timm: e.g. vit_small_patch16_224)
    input_size: int = 0  # 0: the family's own default
    layer: Union[int, str] = "last"  # dense feature layer: "last" or a block index
    weight: Optional[float] = None  # w_t in the total loss; None: 1/T
    base: bool = False  # the general-purpose teacher the student starts from
    bits: int = 16  # 16 | 8 (bitsandbytes int8) | 4 (nf4): the teacher's linear layers
    offload: bool = False  # keep blocks in CPU memory, stream them to the GPU one ahead of use
    min_fidelity: float = 0.95  # quantized teachers: stop if feature cosine vs full precision is lower


@dataclass
class StudentConfig:
    mode: str = "adapter"  # adapter (LoRA, base frozen) | full | scratch
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    input_size: int = 0  # 0: the base teacher's input size
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30 % more compute
    # The backbone: "" takes the base teacher's. In full/scratch mode the student may be a smaller
    # model of the same family (a ViT-B/14 student for a DINOv2-L base, DESIGN §2.4).
    family: str = ""
    model: str = ""
    weights: str = ""  # shipped | hub | none | path; "": the base teacher's weights


@dataclass
class SpaceConfig:
    normalizer: str = "phi-s"  # standardize | phi-s | identity
    calibration_images: int = 64  # images seen by the calibration pass
    head_hidden: int = 512  # hidden width of each student-to-teacher MLP head


@dataclass
class LossConfig:
    distance: str = "cos_smoothl1"  # cos_smoothl1 | cos | mse
    alpha: float = 0.5  # weight of (1 - cos) in cos_smoothl1
    beta: float = 1.0  # smooth-L1 transition point (0: L1)
    global_weight: float = 1.0  # lambda_g
    dense_weight: float = 1.0  # lambda_d
    teacher_drop: float = 0.0  # p of dropping each teacher but the highest-loss one, per step
    kernels: str = "auto"  # auto | torch | triton: how the head's last linear + loss run


@dataclass
class DataConfig:
    source: str = "embedded"  # embedded | path to a folder of images (recursive)
    image_size: int = 160  # crop size fed to the models
    crop_scale_min: float = 0.35  # random resized crop: smallest area fraction
    hflip: bool = True
    fashion_mnist: int = 64  # Fashion-MNIST images added to the embedded set
    num_workers: int = 0


@dataclass
class CacheConfig:
    dir: str = ""  # "": <run dir>/cache
    dtype: str = "fp16"  # fp16 | int8 (per-row scale): storage of the normalised targets
    epochs: int = 4  # augmented views cached per image; training reuses them every `epochs` epochs
    shard_images: int = 1024  # images per shard file


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw8bit (bitsandbytes: 8-bit moments, a quarter of AdamW's state)
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0: off


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # images per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    log_every: int = 1
    checkpoint_every: int = 50
    keep_last: int = 2  # newest step checkpoints kept (the final step's included; model/ is apart)
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops


@dataclass
class DeepSpeedConfig:
    """Used when the engine is DeepSpeed (``engine: deepspeed``, or ``auto`` on CUDA)."""

    zero_stage: int = 2  # 0 | 1 | 2 | 3: what is partitioned across ranks (optimizer, +grads, +params)
    offload_optimizer: str = "none"  # none | cpu: optimizer state and update on the CPU (DeepSpeedCPUAdam)
    offload_param: str = "none"  # none | cpu: parameters in CPU memory between uses (zero_stage 3 only)


@dataclass
class PlanConfig:
    """The memory planner (``lowres-kd plan``; ``memory: auto`` applies its choice to training)."""

    gpu_mem: str = ""  # budget per GPU, e.g. 12GiB; "": the device's total memory
    reserve: float = 0.1  # fraction of the budget kept free for the allocator's fragmentation


@dataclass
class ProbeConfig:
    probes: List[str] = field(default_factory=lambda: ["linear", "edges", "fidelity"])
    labelled: str = "fashion_mnist"  # fashion_mnist | digits
    train_per_class: int = 20
    test_per_class: int = 20
    edge_images: int = 16  # images for the edge probe (half fit, half score)
    fidelity_images: int = 16
    image_size: int = 0  # 0: the data image size


@dataclass
class Recipe:
    name: str
    teachers: List[TeacherConfig]
    output_dir: str = "runs/{name}"
    teachers_from: str = "live"  # live: run the teachers | cache: read `lowres-kd cache` targets, no teacher loaded
    engine: str = "auto"  # auto (DeepSpeed on CUDA when installed, else torch) | deepspeed | torch
    memory: str = "manual"  # manual: the recipe's settings | auto: the planner picks batch, bits, offload, checkpointing
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache.dir.format(name=self.name)) if self.cache.dir else self.run_dir / "cache"

    @property
    def base_teacher(self) -> TeacherConfig:
        return next(t for t in self.teachers if t.base)

    def teacher_weight(self, t: TeacherConfig) -> float:
        return t.weight if t.weight is not None else 1.0 / len(self.teachers)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


RESERVED_NAMES = ("step", "lr", "loss", "dropped", "grad_norm", "images_per_s", "peak_mem_gib", "bad_images",
                  "skipped_steps")  # log.csv columns: a teacher's terms must not overwrite them

CHOICES = {
    "student.mode": ("adapter", "full", "scratch"),
    "loss.kernels": ("auto", "torch", "triton"),
    "train.device": ("auto", "cpu", "cuda"),
    "teachers_from": ("live", "cache"),
    "cache.dtype": ("fp16", "int8"),
    "engine": ("auto", "deepspeed", "torch"),
    "memory": ("manual", "auto"),
    "optim.name": ("adamw", "adamw8bit"),
    "deepspeed.offload_optimizer": ("none", "cpu"),
    "deepspeed.offload_param": ("none", "cpu"),
}


def _registry_choices() -> Dict[str, List[str]]:
    from .losses import DISTANCES
    from .normalizers import NORMALIZERS
    from .probes import PROBES
    from .teachers import TEACHERS

    return {"teacher.family": TEACHERS.list(), "space.normalizer": NORMALIZERS.list(),
            "loss.distance": DISTANCES.list(), "probe.probes": PROBES.list()}


# ----------------------------------------------------------------------------- parsing
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value, tp, key: str, errors: List[str]):
    """Check ``value`` against the annotation ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            sub: List[str] = []
            out = _convert(value, a, key, sub)
            if not sub:
                return out
        errors.append(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return value
    if origin in (list, List):
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {value!r}")
            return value
        return [_convert(v, inner, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool) or tp in (int, float) and isinstance(value, bool):
        errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if not isinstance(value, tp):
        errors.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data, prefix: str, errors: List[str]):
    if not isinstance(data, dict):
        errors.append(f"{prefix or 'recipe'}: expected a mapping, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{full}: unknown key{hint}; allowed: {', '.join(fields)}")
            continue
        kwargs[key] = _convert(value, hints[key], full, errors)
    missing = [k for k, f in fields.items() if k not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for k in missing:
        errors.append(f"{prefix + '.' if prefix else ''}{k}: required key is missing")
    if missing:
        return None
    try:
        return cls(**kwargs)
    except TypeError as exc:
        errors.append(f"{prefix or 'recipe'}: {exc}")
        return None


def _student_families() -> List[str]:
    from .teachers import TEACHERS, can_be_student

    return [f for f in TEACHERS.list() if can_be_student(f)]


def _check_values(r: Recipe, errors: List[str]) -> None:
    def need(ok: bool, key: str, allowed: str, value):
        if not ok:
            errors.append(f"{key}: {value!r} is not allowed; {allowed}")

    def need_shipped(key: str, family: str, weights: str):
        """``shipped`` only for a family whose weights ship inside a package."""
        if weights == "shipped" and family in choices["teacher.family"]:
            from .teachers import ships_weights

            need(ships_weights(family), key, f"hub, none or a file for the {family} family (no weights ship with it)",
                 weights)

    choices = {**CHOICES, **_registry_choices()}
    for key in ("student.mode", "loss.kernels", "train.device", "space.normalizer", "loss.distance", "cache.dtype",
                "teachers_from", "engine", "memory", "optim.name", "deepspeed.offload_optimizer",
                "deepspeed.offload_param"):
        value = r
        for attr in key.split("."):
            value = getattr(value, attr)
        need(value in choices[key], key, f"one of {', '.join(choices[key])}", value)
    for i, p in enumerate(r.probe.probes):
        need(p in choices["probe.probes"], f"probe.probes[{i}]", f"one of {', '.join(choices['probe.probes'])}", p)

    need(bool(r.name.strip()), "name", "a non-empty run name", r.name)
    need(r.cache.epochs >= 1, "cache.epochs", "an integer >= 1", r.cache.epochs)
    need(r.cache.shard_images >= 1, "cache.shard_images", "an integer >= 1", r.cache.shard_images)
    need(bool(r.output_dir.strip()), "output_dir", "a non-empty path (may contain {name})", r.output_dir)
    need(len(r.teachers) >= 1, "teachers", "at least one teacher", r.teachers)
    names = [t.name for t in r.teachers]
    for i, t in enumerate(r.teachers):
        k = f"teachers[{i}]"
        need(t.family in choices["teacher.family"], f"{k}.family", f"one of {', '.join(choices['teacher.family'])}", t.family)
        need(names.count(t.name) == 1, f"{k}.name", "names must be unique", t.name)
        need(t.name.isidentifier(), f"{k}.name", "letters, digits and _ (a Python identifier)", t.name)
        need(t.name not in RESERVED_NAMES, f"{k}.name", f"a name other than the log columns {', '.join(RESERVED_NAMES)}", t.name)
        need(t.input_size >= 0, f"{k}.input_size", "0 (family default) or a positive size", t.input_size)
        need(t.weight is None or t.weight >= 0, f"{k}.weight", "a weight >= 0 or null (1/T)", t.weight)
        need(t.layer == "last" or isinstance(t.layer, int) and t.layer >= 0, f"{k}.layer", "'last' or a block index >= 0",
             t.layer)
        need_shipped(f"{k}.weights", t.family, t.weights)
        need(t.bits in (16, 8, 4), f"{k}.bits", "16, 8 or 4", t.bits)
        need(0 <= t.min_fidelity <= 1, f"{k}.min_fidelity", "a cosine in [0, 1]", t.min_fidelity)
        if t.base and t.family in choices["teacher.family"]:
            bases = _student_families()
            need(t.family in bases, f"{k}.family", f"a family that can be the student's base: {', '.join(bases)}",
                 t.family)
        if t.base and r.student.mode == "adapter":
            need(t.bits == 16, f"{k}.bits", "16 for the base teacher in adapter mode (it is the student's own "
                 "frozen backbone; quantizing it is not supported yet)", t.bits)
            need(not t.offload, f"{k}.offload", "false for the base teacher in adapter mode (it is the student)", t.offload)
        w = t.weights
        if w not in ("shipped", "hub", "none") and not Path(w).is_file():
            errors.append(f"{k}.weights: file not found: {w} (or use shipped | hub | none)")
    n_base = sum(t.base for t in r.teachers)
    need(n_base == 1, "teachers[*].base", "exactly one teacher must have base: true", n_base)

    s = r.student
    need(s.lora_rank >= 1, "student.lora_rank", "an integer >= 1", s.lora_rank)
    need(s.lora_alpha > 0, "student.lora_alpha", "> 0", s.lora_alpha)
    need(0 <= s.lora_dropout < 1, "student.lora_dropout", "in [0, 1)", s.lora_dropout)
    need(s.input_size >= 0, "student.input_size", "0 (base input size) or a positive size", s.input_size)
    if s.mode == "adapter":  # the adapter-disabled student *is* the base teacher
        for key in ("family", "model", "weights"):
            need(getattr(s, key) == "", f"student.{key}", "'' in adapter mode (the student is the base teacher "
                 "itself; use mode full for a different backbone)", getattr(s, key))
    if s.family:
        bases = _student_families()
        need(s.family in bases, "student.family", f"'' or a family that can be the student: {', '.join(bases)}", s.family)
    need_shipped("student.weights", s.family or next((t.family for t in r.teachers if t.base), ""), s.weights)
    if s.weights not in ("", "shipped", "hub", "none") and not Path(s.weights).is_file():
        errors.append(f"student.weights: file not found: {s.weights} (or use '' | shipped | hub | none)")
    ds = r.deepspeed
    need(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "0, 1, 2 or 3", ds.zero_stage)
    need(ds.offload_param == "none" or ds.zero_stage == 3, "deepspeed.offload_param",
         "none unless deepspeed.zero_stage is 3 (only ZeRO-3 partitions parameters)", ds.offload_param)
    need(ds.offload_optimizer == "none" or ds.zero_stage >= 1, "deepspeed.offload_optimizer",
         "none at deepspeed.zero_stage 0 (offloading needs ZeRO 1-3)", ds.offload_optimizer)
    need(0 <= r.plan.reserve < 1, "plan.reserve", "a fraction in [0, 1)", r.plan.reserve)
    if r.plan.gpu_mem:
        from .units import parse_bytes

        try:
            parse_bytes(r.plan.gpu_mem)
        except ValueError as exc:
            errors.append(f"plan.gpu_mem: {r.plan.gpu_mem!r} is not allowed; a size such as 12GiB, 8GB or 512MiB, "
                          f"or '' for the device's memory ({exc})")
    need(r.space.calibration_images >= 2, "space.calibration_images", "at least 2", r.space.calibration_images)
    need(r.space.head_hidden >= 1, "space.head_hidden", "an integer >= 1", r.space.head_hidden)
    lo = r.loss
    need(0 <= lo.alpha <= 1, "loss.alpha", "in [0, 1]", lo.alpha)
    need(lo.beta >= 0, "loss.beta", ">= 0", lo.beta)
    need(lo.global_weight >= 0, "loss.global_weight", ">= 0", lo.global_weight)
    need(lo.dense_weight >= 0, "loss.dense_weight", ">= 0", lo.dense_weight)
    need(lo.global_weight + lo.dense_weight > 0, "loss.global_weight + loss.dense_weight", "> 0", lo.global_weight + lo.dense_weight)
    need(0 <= lo.teacher_drop < 1, "loss.teacher_drop", "in [0, 1)", lo.teacher_drop)
    d = r.data
    need(d.source == "embedded" or Path(d.source).is_dir(), "data.source", "'embedded' or an existing folder", d.source)
    need(d.image_size >= 32, "data.image_size", "at least 32", d.image_size)
    need(0 < d.crop_scale_min <= 1, "data.crop_scale_min", "in (0, 1]", d.crop_scale_min)
    need(d.fashion_mnist >= 0, "data.fashion_mnist", ">= 0", d.fashion_mnist)
    need(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
    o = r.optim
    need(o.lr > 0, "optim.lr", "> 0", o.lr)
    need(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", o.betas)
    need(o.warmup_steps >= 0, "optim.warmup_steps", ">= 0", o.warmup_steps)
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]", o.min_lr_ratio)
    need(o.grad_clip >= 0, "optim.grad_clip", ">= 0 (0: off)", o.grad_clip)
    t = r.train
    for key in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "max_bad_steps"):
        need(getattr(t, key) >= 1, f"train.{key}", "an integer >= 1", getattr(t, key))
    need(t.keep_last >= 1, "train.keep_last", "an integer >= 1", t.keep_last)
    need(t.seed >= 0, "train.seed", "an integer >= 0", t.seed)
    p = r.probe
    need(p.labelled in ("fashion_mnist", "digits"), "probe.labelled", "fashion_mnist | digits", p.labelled)
    for key in ("train_per_class", "test_per_class", "fidelity_images"):
        need(getattr(p, key) >= 2, f"probe.{key}", "an integer >= 2", getattr(p, key))
    need(p.edge_images >= 4, "probe.edge_images", "an integer >= 4 (half fit, half scored, 2-fold CV)", p.edge_images)
    need(p.image_size >= 0, "probe.image_size", "0 (data.image_size) or a size", p.image_size)


def dict_differences(found, expected, prefix: str = "", names=("cache", "recipe")) -> List[str]:
    """Every leaf where two nested dicts differ, as 'a.b: <found> has X, <expected> has Y' lines."""
    out = []
    if isinstance(found, dict) and isinstance(expected, dict):
        for key in sorted(set(found) | set(expected)):
            where = f"{prefix}.{key}" if prefix else key
            if key not in found:
                out.append(f"{where}: missing in the {names[0]} ({names[1]}: {expected[key]!r})")
            elif key not in expected:
                out.append(f"{where}: in the {names[0]} but not in the {names[1]} ({found[key]!r})")
            else:
                out += dict_differences(found[key], expected[key], where, names)
    elif found != expected:
        out.append(f"{prefix}: {names[0]} has {found!r}, {names[1]} has {expected!r}")
    return out


def _parse_value(text: str):
    return yaml.safe_load(text)


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """``a.b=value`` (value parsed as YAML); ``teachers.1.weight=0.5`` indexes lists."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        parts = key.split(".")
        node = data
        try:
            for i, part in enumerate(parts[:-1]):
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise RecipeError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = _parse_value(text)
            else:
                node[last] = _parse_value(text)
        except (IndexError, ValueError) as exc:
            raise RecipeError(f"--set {key}: no such list item ({exc}); lists are indexed from 0") from None
    return data


def recipe_from_dict(data: Dict[str, Any], source: str = "recipe", check_values: bool = True) -> Recipe:
    """Build a Recipe; ``check_values=False`` only checks keys and types (to rebuild a saved run
    whose weight files or data folder may since have moved)."""
    errors: List[str] = []
    recipe = _build(Recipe, data, "", errors)
    if recipe is not None and not errors and check_values:
        _check_values(recipe, errors)
    if errors:
        raise RecipeError(f"{source} has {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return recipe


def load_recipe(path: str | Path, overrides: Optional[List[str]] = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML (only plain YAML, no Python tags): {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    return recipe_from_dict(apply_overrides(data, overrides or []), str(path))
