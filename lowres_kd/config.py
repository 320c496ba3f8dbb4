"""Recipes: YAML loading and validation over the schema (``lowres_kd.schema``).

``load_recipe(path, overrides)`` reads YAML with ``yaml.safe_load``, applies ``--set a.b=value``
overrides, refuses unknown keys, wrong types and impossible values, and reports every problem at
once, each naming its key and what is allowed. The allowed values of a key come from the schema's
field metadata or from the registry it names, never from a list kept here.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from .data import PROBE_SETS, FolderSource, is_shard_pattern, shard_paths
from .losses import DISTANCES
from .normalizers import NORMALIZERS
from .probes import PROBES
from .errors import UserError
from .registry import Registry
from .schema import (CacheConfig, DataConfig, DeepSpeedConfig, LossConfig, OptimConfig, PlanConfig, ProbeConfig, Recipe,
                     SpaceConfig, StudentConfig, TeacherConfig, TrainConfig)
from .teachers import TEACHERS, can_be_student, graph_problems, ships_weights
from .units import parse_bytes

__all__ = ["CacheConfig", "DataConfig", "DeepSpeedConfig", "LossConfig", "OptimConfig", "PlanConfig", "ProbeConfig",
           "Recipe", "RecipeError", "SpaceConfig", "StudentConfig", "TeacherConfig", "TrainConfig", "apply_overrides",
           "load_recipe", "recipe_from_dict"]


class RecipeError(UserError, ValueError):
    """A recipe that cannot run; the message lists every problem, one per line."""


INT_LIMIT = 2**63  # an integer key must fit in int64 (torch, numpy and the planner's arithmetic)
_BAD = object()  # a value _convert refused: the key takes its default, so the rest can still be checked


REGISTRIES: Dict[str, Registry] = {"teacher": TEACHERS, "normalizer": NORMALIZERS, "distance": DISTANCES,
                                   "probe": PROBES}

# Upper bounds: beyond them a value overflows the planner's arithmetic, a tensor's size or the
# machine, long before it could be meant (each message names its bound).
MAX_SIZE = 8192  # pixels per side: data.image_size, input sizes (the image loader's 8192 x 8192 limit)
MAX_BATCH = 65536  # train.batch_size, train.grad_accum
MAX_STEPS = 10**9  # train.steps and the other step counts
MAX_IMAGES = 10**7  # calibration, probe and shard image counts
MAX_WIDTH = 65536  # head_hidden, lora_rank
MAX_LAYER = 4096  # a teacher's block index
MAX_EPOCHS = 10**4  # cache.epochs
MAX_RANK = 2**16  # cache.rank: wider than any teacher's features
MAX_WORKERS = 1024  # data.num_workers
MAX_FASHION_MNIST = 60000  # Fashion-MNIST's training set
MAX_WEIGHT = 1e6  # learning rate, weights, beta, alpha, clipping: sums and products stay finite
MAX_BYTES = 2**60  # plan.gpu_mem

RESERVED_NAMES = ("step", "lr", "loss", "dropped", "grad_norm", "images_per_s", "peak_mem_gib", "bad_images",
                  "skipped_steps")  # log.csv columns: a teacher's terms must not overwrite them

# ----------------------------------------------------------------------------- parsing
def _type_name(tp) -> str:
    if tp is type(None):
        return "null"  # as the YAML is written
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value, tp, key: str, errors: List[str]):
    """Check ``value`` against the annotation ``tp``; the converted value, or ``_BAD`` (reported)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        subs: List[str] = []
        for a in args:
            if a is type(None):
                continue
            sub: List[str] = []
            out = _convert(value, a, key, sub)
            if not sub:
                return out
            subs += sub
        right_type = [e for e in subs if "expected a finite" in e or "below 2**63" in e]  # the type fits, the value not
        errors.append(right_type[0] if right_type else
                      f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return _BAD
    if origin in (dict, Dict):
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return _BAD
        out = {_convert(k, key_type, f"{key} (a key)", errors): _convert(v, value_type, f"{key}.{k}", errors)
               for k, v in value.items()}
        return _BAD if any(k is _BAD or v is _BAD for k, v in out.items()) else out
    if origin in (list, List):
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {value!r}")
            return _BAD
        items = [_convert(v, inner, f"{key}[{i}]", errors) for i, v in enumerate(value)]
        return _BAD if any(v is _BAD for v in items) else items
    if dataclasses.is_dataclass(tp):
        out = _build(tp, value, key, errors)
        return _BAD if out is None else out
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= INT_LIMIT:
            errors.append(f"{key}: {value!r} is not allowed; a number below 2**63 in size")
            return _BAD
        return float(value)
    if tp is bool and not isinstance(value, bool) or tp in (int, float) and isinstance(value, bool):
        errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return _BAD
    if not isinstance(value, tp):
        errors.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return _BAD
    if tp is float and not math.isfinite(value):
        errors.append(f"{key}: expected a finite number, got {value!r}")
        return _BAD
    if tp is int and abs(value) >= INT_LIMIT:
        errors.append(f"{key}: {value!r} is not allowed; an integer below 2**63 in size")
        return _BAD
    return value


def _placeholder(tp):
    """A stand-in for a required key that is missing or refused (already reported): "", 0 or []."""
    origin = typing.get_origin(tp)
    if origin in (list, List):
        return []
    return tp() if tp in (str, int, float) else None


def _build(cls, data, prefix: str, errors: List[str]):
    """``cls`` from ``data``; a refused key is reported and takes its default (a required one a
    placeholder), so that the values of the others can still be checked in the same report."""
    if not isinstance(data, dict):
        errors.append(f"{prefix or 'recipe'}: expected a mapping, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if not isinstance(key, str) or key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{full}: unknown key{hint}; allowed: {', '.join(fields)}")
            continue
        out = _convert(value, hints[key], full, errors)
        if out is not _BAD:
            kwargs[key] = out
        elif fields[key].default is dataclasses.MISSING and fields[key].default_factory is dataclasses.MISSING:
            kwargs[key] = _placeholder(hints[key])
    for k, f in fields.items():
        if k not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix + '.' if prefix else ''}{k}: required key is missing")
            kwargs[k] = _placeholder(hints[k])
    if any(v is None and typing.get_origin(hints[k]) is not Union for k, v in kwargs.items()):
        return None
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - every field is known and typed above
        errors.append(f"{prefix or 'recipe'}: {exc}")
        return None


def _graph_problems(t: TeacherConfig) -> Optional[List[str]]:
    """A graph teacher's own problems (None for torch families and unknown ones)."""
    return graph_problems(t) if t.family in TEACHERS else None


def _student_families() -> List[str]:
    return [f for f in TEACHERS.list() if can_be_student(f)]


def _allowed(f: dataclasses.Field) -> Optional[List[str]]:
    """The values a schema field allows: its ``one_of`` choices or its registry's names."""
    if "choices" in f.metadata:
        return list(f.metadata["choices"])
    if "registry" in f.metadata:
        return REGISTRIES[f.metadata["registry"]].list()
    return None


def _check_choices(node, prefix: str, errors: List[str]) -> None:
    """Every key of ``node`` (a schema dataclass, recursively) that allows a fixed set of values."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}.{f.name}" if prefix else f.name
        allowed = _allowed(f)
        if allowed is not None:
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, v in items:
                if v not in allowed:
                    errors.append(f"{key if i is None else f'{key}[{i}]'}: {v!r} is not allowed; one of {', '.join(allowed)}")
        elif dataclasses.is_dataclass(value):
            _check_choices(value, key, errors)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_choices(item, f"{key}[{i}]", errors)


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a NUL byte, a name too long
        return False


def _is_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def _needs(errors: List[str]):
    """``need(ok, key, allowed, value)``: appends the line for ``key`` to ``errors`` unless ok."""
    def need(ok: bool, key: str, allowed: str, value):
        if not ok:
            errors.append(f"{key}: {value!r} is not allowed; {allowed}")

    return need


def _check_values(r: Recipe, errors: List[str]) -> None:
    need = _needs(errors)

    def need_shipped(key: str, family: str, weights: str):
        """``shipped`` only for a family whose weights ship inside a package."""
        if weights == "shipped" and family in TEACHERS:
            need(ships_weights(family), key, f"hub, none or a file for the {family} family (no weights ship with it)",
                 weights)

    _check_choices(r, "", errors)

    need(bool(r.name.strip()), "name", "a non-empty run name", r.name)
    need(1 <= r.cache.epochs <= MAX_EPOCHS, "cache.epochs", f"an integer >= 1 and <= {MAX_EPOCHS}", r.cache.epochs)
    need(1 <= r.cache.shard_images <= MAX_IMAGES, "cache.shard_images", f"an integer >= 1 and <= {MAX_IMAGES}",
         r.cache.shard_images)
    need(r.cache.rank is None or 1 <= r.cache.rank <= MAX_RANK, "cache.rank",
         f"null or an integer >= 1 and <= {MAX_RANK} (at most a cached teacher's width)", r.cache.rank)
    need(2 <= r.cache.rank_images <= MAX_IMAGES, "cache.rank_images", f"an integer >= 2 and <= {MAX_IMAGES}",
         r.cache.rank_images)
    need(bool(r.output_dir.strip()), "output_dir", "a non-empty path (may contain {name})", r.output_dir)
    try:
        r.output_dir.format(name=r.name)
    except (KeyError, IndexError, ValueError):
        errors.append(f"output_dir: {r.output_dir!r} is not allowed; a path whose only field is {{name}}")
    need(len(r.teachers) >= 1, "teachers", "at least one teacher", r.teachers)
    names = [t.name for t in r.teachers]
    for i, t in enumerate(r.teachers):
        k = f"teachers[{i}]"
        need(names.count(t.name) == 1, f"{k}.name", "names must be unique", t.name)
        need(t.name.isidentifier(), f"{k}.name", "letters, digits and _ (a Python identifier)", t.name)
        need(t.name not in RESERVED_NAMES, f"{k}.name", f"a name other than the log columns {', '.join(RESERVED_NAMES)}", t.name)
        need(0 <= t.input_size <= MAX_SIZE, f"{k}.input_size", f"0 (family default) or a positive size <= {MAX_SIZE}",
             t.input_size)
        need(0 <= t.dense_grid <= MAX_SIZE, f"{k}.dense_grid", f"0 (the map as given) or a grid size in [1, {MAX_SIZE}]",
             t.dense_grid)
        need(t.weight is None or 0 <= t.weight <= MAX_WEIGHT, f"{k}.weight", f"a weight in [0, {MAX_WEIGHT:g}] or null (1/T)",
             t.weight)
        need(t.layer == "last" or isinstance(t.layer, int) and 0 <= t.layer <= MAX_LAYER, f"{k}.layer",
             f"'last' or a block index in [0, {MAX_LAYER}]", t.layer)
        graph = _graph_problems(t)
        if graph is None:
            need_shipped(f"{k}.weights", t.family, t.weights)
            for key in ("outputs", "mean", "std"):
                need(not getattr(t, key), f"{k}.{key}", "empty: only graph teachers (family onnx) read it",
                     getattr(t, key))
        else:  # the family checks its own weights, outputs, mean and std
            errors.extend(f"{k}.{p}" for p in graph)
            need(t.bits == 16, f"{k}.bits", f"16: the {t.family} family runs its graph in onnxruntime, there are no "
                 "torch linears for bitsandbytes to quantize", t.bits)
            need(not t.offload, f"{k}.offload", f"false: the {t.family} family runs its graph in onnxruntime, there are "
                 "no torch blocks to stream", t.offload)
        need(t.bits in (16, 8, 4), f"{k}.bits", "16, 8 or 4", t.bits)
        need(0 <= t.min_fidelity <= 1, f"{k}.min_fidelity", "a cosine in [0, 1]", t.min_fidelity)
        if t.base and t.family in TEACHERS:
            bases = _student_families()
            need(t.family in bases, f"{k}.family", f"a family that can be the student's base: {', '.join(bases)}",
                 t.family)
        if r.inside_student(t):
            need(not t.offload, f"{k}.offload", "false for the base teacher in adapter mode: it is the student's own "
                 "backbone, which runs forward and backward every step, so its blocks stay on the device (offload "
                 "streams a frozen teacher's blocks through a no-grad forward); lower its bits to 8 or 4 instead",
                 t.offload)
            need(t.bits == 16 or r.engine != "deepspeed", "engine", "torch or auto with a quantized base in adapter "
                 f"mode ({k}.bits={t.bits}): DeepSpeed casts and partitions every parameter of the student, "
                 "bitsandbytes' int8/nf4 weights included", r.engine)
        w = t.weights
        if graph is None and w not in ("shipped", "hub", "none") and not _is_file(w):
            errors.append(f"{k}.weights: file not found: {w} (or use shipped | hub | none)")
    n_base = sum(t.base for t in r.teachers)
    need(n_base == 1, "teachers[*].base", "exactly one teacher must have base: true", n_base)
    if r.teachers_from == "cache":
        need(bool(r.cached_teachers), "teachers[*].cache", "at least one teacher with cache: true when "
             "teachers_from is cache (or set teachers_from: live)", [t.cache for t in r.teachers])

    s = r.student
    need(1 <= s.lora_rank <= MAX_WIDTH, "student.lora_rank", f"an integer >= 1 and <= {MAX_WIDTH}", s.lora_rank)
    need(0 < s.lora_alpha <= MAX_WEIGHT, "student.lora_alpha", f"> 0 and <= {MAX_WEIGHT:g}", s.lora_alpha)
    need(0 <= s.lora_dropout < 1, "student.lora_dropout", "in [0, 1)", s.lora_dropout)
    need(0 <= s.input_size <= MAX_SIZE, "student.input_size", f"0 (base input size) or a positive size <= {MAX_SIZE}",
         s.input_size)
    if s.mode == "adapter":  # the adapter-disabled student *is* the base teacher
        for key in ("family", "model", "weights"):
            need(getattr(s, key) == "", f"student.{key}", "'' in adapter mode (the student is the base teacher "
                 "itself; use mode full for a different backbone)", getattr(s, key))
    if s.family:
        bases = _student_families()
        need(s.family in bases, "student.family", f"'' or a family that can be the student: {', '.join(bases)}", s.family)
    need_shipped("student.weights", s.family or next((t.family for t in r.teachers if t.base), ""), s.weights)
    if s.weights not in ("", "shipped", "hub", "none") and not _is_file(s.weights):
        errors.append(f"student.weights: file not found: {s.weights} (or use '' | shipped | hub | none)")
    ds = r.deepspeed
    need(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "0, 1, 2 or 3", ds.zero_stage)
    need(ds.offload_param == "none" or ds.zero_stage == 3, "deepspeed.offload_param",
         "none unless deepspeed.zero_stage is 3 (only ZeRO-3 partitions parameters)", ds.offload_param)
    need(ds.offload_optimizer == "none" or ds.zero_stage >= 1, "deepspeed.offload_optimizer",
         "none at deepspeed.zero_stage 0 (offloading needs ZeRO 1-3)", ds.offload_optimizer)
    need(0 <= r.plan.reserve < 1, "plan.reserve", "a fraction in [0, 1)", r.plan.reserve)
    if r.plan.gpu_mem:
        try:
            if not 0 < parse_bytes(r.plan.gpu_mem) <= MAX_BYTES:
                raise ValueError(f"between 1 byte and 2**60 bytes (1 EiB)")
        except (ValueError, OverflowError) as exc:
            errors.append(f"plan.gpu_mem: {r.plan.gpu_mem!r} is not allowed; a size such as 12GiB, 8GB or 512MiB, "
                          f"or '' for the device's memory ({exc})")
    need(2 <= r.space.calibration_images <= MAX_IMAGES, "space.calibration_images", f"at least 2 and at most {MAX_IMAGES}",
         r.space.calibration_images)
    need(1 <= r.space.head_hidden <= MAX_WIDTH, "space.head_hidden", f"an integer >= 1 and <= {MAX_WIDTH}",
         r.space.head_hidden)
    lo = r.loss
    need(0 <= lo.alpha <= 1, "loss.alpha", "in [0, 1]", lo.alpha)
    for key in ("beta", "global_weight", "dense_weight"):
        need(0 <= getattr(lo, key) <= MAX_WEIGHT, f"loss.{key}", f">= 0 and <= {MAX_WEIGHT:g}", getattr(lo, key))
    need(lo.global_weight + lo.dense_weight > 0, "loss.global_weight + loss.dense_weight", "> 0", lo.global_weight + lo.dense_weight)
    need(0 <= lo.teacher_drop < 1, "loss.teacher_drop", "in [0, 1)", lo.teacher_drop)
    d = r.data
    try:
        if is_shard_pattern(d.source):
            shard_paths(d.source)  # that each shard exists: listing their members would read them all
        elif d.source != "embedded" and _is_dir(d.source):
            FolderSource(d.source)  # that it holds an image file (a scan, nothing decoded)
        else:
            need(d.source == "embedded", "data.source", "'embedded', an existing folder, or tar shards that all "
                 "exist (a .tar file or a pattern such as /data/train-{000000..000099}.tar)", d.source)
    except UserError as exc:
        errors.append(f"data.source: {exc}")
    need(32 <= d.image_size <= MAX_SIZE, "data.image_size", f"at least 32 and at most {MAX_SIZE}", d.image_size)
    need(0 < d.crop_scale_min <= 1, "data.crop_scale_min", "in (0, 1]", d.crop_scale_min)
    need(0 <= d.fashion_mnist <= MAX_FASHION_MNIST, "data.fashion_mnist",
         f">= 0 and <= {MAX_FASHION_MNIST} (the training set's size)", d.fashion_mnist)
    need(0 <= d.num_workers <= MAX_WORKERS, "data.num_workers", f">= 0 and <= {MAX_WORKERS}", d.num_workers)
    need(len(set(d.holdout)) == len(d.holdout), "data.holdout", "distinct image names", d.holdout)
    need(r.probe.images != "holdout" or len(d.holdout) > 0, "probe.images",
         "without data.holdout: 'holdout' needs the names of data.source images training never sees", r.probe.images)
    o = r.optim
    need(0 < o.lr <= MAX_WEIGHT, "optim.lr", f"> 0 and <= {MAX_WEIGHT:g}", o.lr)
    need(0 <= o.weight_decay <= MAX_WEIGHT, "optim.weight_decay", f">= 0 and <= {MAX_WEIGHT:g}", o.weight_decay)
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", o.betas)
    need(0 <= o.warmup_steps <= MAX_STEPS, "optim.warmup_steps", f">= 0 and <= {MAX_STEPS}", o.warmup_steps)
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]", o.min_lr_ratio)
    need(0 <= o.grad_clip <= MAX_WEIGHT, "optim.grad_clip", f">= 0 (0: off) and <= {MAX_WEIGHT:g}", o.grad_clip)
    t = r.train
    for key in ("steps", "log_every", "checkpoint_every", "max_bad_steps", "keep_last"):
        need(1 <= getattr(t, key) <= MAX_STEPS, f"train.{key}", f"an integer >= 1 and <= {MAX_STEPS}", getattr(t, key))
    for key in ("batch_size", "grad_accum"):
        need(1 <= getattr(t, key) <= MAX_BATCH, f"train.{key}", f"an integer >= 1 and <= {MAX_BATCH}", getattr(t, key))
    need(t.seed >= 0, "train.seed", "an integer >= 0", t.seed)
    need("csv" in t.log, "train.log", "a list that includes csv (reports and resume read log.csv); "
         "tensorboard goes beside it", t.log)
    _check_probe(r.probe, errors)


def _check_probe(p: ProbeConfig, errors: List[str]) -> None:
    """The probe section's values (also checked alone: ``lowres-kd probe --set probe.KEY=...``)."""
    need = _needs(errors)
    for key in ("train_per_class", "test_per_class", "fidelity_images"):
        need(2 <= getattr(p, key) <= MAX_IMAGES, f"probe.{key}", f"an integer >= 2 and <= {MAX_IMAGES}", getattr(p, key))
    for key in ("knn_k", "segmentation_train", "segmentation_test"):
        need(1 <= getattr(p, key) <= MAX_IMAGES, f"probe.{key}", f"an integer >= 1 and <= {MAX_IMAGES}", getattr(p, key))
    need(1 <= p.segmentation_steps <= MAX_STEPS, "probe.segmentation_steps", f"an integer >= 1 and <= {MAX_STEPS}",
         p.segmentation_steps)
    need(0 < p.knn_temperature <= MAX_WEIGHT, "probe.knn_temperature", f"> 0 and <= {MAX_WEIGHT:g}", p.knn_temperature)
    need(0 < p.val_fraction < 1, "probe.val_fraction", "in (0, 1)", p.val_fraction)
    need(len(p.data) > 0 and len(set(p.data)) == len(p.data), "probe.data",
         "a non-empty list of distinct labelled sets", p.data)
    for i, spec in enumerate(p.data):
        need(spec in PROBE_SETS or _is_dir(spec), f"probe.data[{i}]",
             f"one of {', '.join(PROBE_SETS)} or an existing folder", spec)
    need(p.images in ("", "embedded", "holdout") or _is_dir(p.images), "probe.images",
         "'' (the defaults), 'holdout' (data.holdout), 'embedded' or an existing folder", p.images)
    need(4 <= p.edge_images <= MAX_IMAGES, "probe.edge_images",
         f"an integer >= 4 (half fit, half scored, 2-fold CV) and <= {MAX_IMAGES}", p.edge_images)
    need(0 <= p.image_size <= MAX_SIZE, "probe.image_size", f"0 (data.image_size) or a size <= {MAX_SIZE}", p.image_size)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last
    one silently: a recipe would run with a value its reader did not see)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # SafeLoader reports unhashable keys itself
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first at line {seen[key] + 1}); give each key once",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def safe_load_unique(text: str):
    """``yaml.safe_load`` that refuses duplicate keys (``yaml.YAMLError`` naming the key and lines)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what, and the line it is on."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def _parse_value(text: str):
    return safe_load_unique(text)


def _index(part: str, node: list, key: str) -> int:
    """A list index from ``--set``: 0 .. len - 1; negative indices are refused (``-1`` would edit
    the last teacher without saying so)."""
    try:
        i = int(part)
    except ValueError:
        raise RecipeError(f"--set {key}: {part!r} is not a list index; lists are indexed from 0") from None
    if i < 0:
        raise RecipeError(f"--set {key}: negative list index {part} refused (it would pick an item counted from the "
                          f"end without saying which); lists are indexed from 0 to {len(node) - 1}")
    if not i < len(node):
        raise RecipeError(f"--set {key}: no such list item {part} (the list has {len(node)}); "
                          f"lists are indexed from 0 to {len(node) - 1}")
    return i


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """``a.b=value`` (value parsed as YAML); ``teachers.1.weight=0.5`` indexes lists."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        parts = key.split(".")
        if not all(parts):
            raise RecipeError(f"--set {key}: an empty key part; write e.g. train.steps=20")
        try:
            value = _parse_value(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {key}: the value is not valid YAML ({_yaml_problem(exc)})") from None
        node = data
        for i, part in enumerate(parts[:-1]):
            node = node[_index(part, node, key)] if isinstance(node, list) else node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, node, key)] = value
        else:
            node[last] = value
    return data


def _under(key: str, reported: List[str]) -> bool:
    return any(key == r or key.startswith((r + ".", r + "[")) for r in reported)


def recipe_from_dict(data: Dict[str, Any], source: str = "recipe", check_values: bool = True) -> Recipe:
    """Build a Recipe; ``check_values=False`` only checks keys and types (to rebuild a saved run
    whose weight files or data folder may since have moved). Unknown keys, wrong types and
    impossible values come in one report; a value check on a key already refused is left out."""
    errors: List[str] = []
    probe = data.get("probe") if isinstance(data, dict) else None
    if not check_values and isinstance(probe, dict) and "labelled" in probe:
        # a run saved before probe.data listed the labelled sets
        data = {**data, "probe": {**{k: v for k, v in probe.items() if k != "labelled"},
                                  "data": [probe["labelled"], "pasted"]}}
    recipe = _build(Recipe, data, "", errors)
    if recipe is not None and check_values:
        reported = [e.split(":", 1)[0] for e in errors]
        values: List[str] = []
        _check_values(recipe, values)
        errors += [e for e in values if not _under(e.split(":", 1)[0], reported)]
    if errors:
        raise RecipeError(f"{source} has {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return recipe


def probe_problems(probe: ProbeConfig) -> List[str]:
    """The refused choices and impossible values of a probe section, one line each."""
    errors: List[str] = []
    _check_choices(probe, "probe", errors)
    _check_probe(probe, errors)
    return errors


def load_recipe(path: str | Path, overrides: Optional[List[str]] = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = safe_load_unique(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML (only plain YAML, no Python tags, each key once): "
                          f"{_yaml_problem(exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot be read as a text file ({exc})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    return recipe_from_dict(apply_overrides(data, overrides or []), str(path))
