"""Every recipe key, three ways: a wrong type, an out-of-range value, a misspelt name.

The sweep walks the dataclasses, so a new key is tested by being added; a numeric key must also
be given an out-of-range case below (or be listed as unbounded, with the reason).
"""
import dataclasses
import typing

import pytest

from helpers import tiny_recipe_dict
from lowres_kd.config import (CacheConfig, DataConfig, DeepSpeedConfig, LossConfig, OptimConfig, PlanConfig, ProbeConfig,
                              Recipe, RecipeError, SpaceConfig, StudentConfig, TeacherConfig, TrainConfig, recipe_from_dict)

SECTIONS = {"cache": CacheConfig, "student": StudentConfig, "space": SpaceConfig, "loss": LossConfig, "data": DataConfig,
            "optim": OptimConfig, "train": TrainConfig, "probe": ProbeConfig, "deepspeed": DeepSpeedConfig,
            "plan": PlanConfig}
TOP = [f.name for f in dataclasses.fields(Recipe) if f.name not in SECTIONS]


def all_keys():
    keys = [("", name) for name in TOP if name != "teachers"]
    keys += [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    keys += [("teachers[0]", f.name) for f in dataclasses.fields(TeacherConfig)]
    return keys


OUT_OF_RANGE = {
    "student.mode": "lora", "student.lora_rank": 0, "student.lora_alpha": 0.0, "student.lora_dropout": 1.0,
    "student.input_size": -1,
    "space.normalizer": "pca", "space.calibration_images": 1, "space.head_hidden": 0,
    "loss.distance": "l2", "loss.alpha": -0.1, "loss.beta": -1.0, "loss.global_weight": -1.0,
    "loss.dense_weight": -1.0, "loss.teacher_drop": 1.0, "loss.kernels": "cuda",
    "data.source": "/no/such/folder", "data.image_size": 16, "data.crop_scale_min": 0.0, "data.fashion_mnist": -1,
    "data.num_workers": -1, "data.holdout": ["skimage:coffee", "skimage:coffee"],
    "optim.lr": 0.0, "optim.weight_decay": -0.1, "optim.betas": [0.9, 1.0], "optim.warmup_steps": -1,
    "optim.min_lr_ratio": 1.5, "optim.grad_clip": -1.0,
    "train.steps": 0, "train.batch_size": 0, "train.grad_accum": 0, "train.device": "tpu", "train.log_every": 0,
    "train.checkpoint_every": 0, "train.keep_last": 0, "train.max_bad_steps": 0, "train.seed": -1,
    "train.log": ["csv", "wandb"],
    "probe.probes": ["dino"], "probe.data": ["cifar"], "probe.train_per_class": 1, "probe.test_per_class": 1,
    "probe.val_fraction": 1.0, "probe.knn_k": 0, "probe.knn_temperature": 0.0, "probe.segmentation_train": 0,
    "probe.segmentation_test": 0, "probe.segmentation_steps": 0, "probe.images": "/no/such/folder",
    "probe.edge_images": 3, "probe.fidelity_images": 1, "probe.image_size": -1,
    "teachers[0].family": "resnet", "teachers[0].weights": "/no/such/file.pt", "teachers[0].input_size": -1, "teachers[0].dense_grid": -1,
    "teachers[0].layer": -1, "teachers[0].bits": 3, "teachers[0].min_fidelity": 1.5,
    "teachers[0].offload": True, "teachers[0].weight": -1.0, "teachers[0].base": False, "teachers[0].name": "a.b",
    "teachers[0].outputs": {"dense": "features"}, "teachers[0].mean": [0.5], "teachers[0].std": [0.2, 0.2, 0.2],
    "name": "", "output_dir": "", "teachers_from": "disk",
    "cache.dtype": "int4", "cache.epochs": 0, "cache.shard_images": 0, "cache.rank": 0, "cache.rank_images": 1,
    "engine": "jax", "memory": "max", "optim.name": "sgd",
    "student.family": "hed", "student.model": "vit_base_patch14_dinov2", "student.weights": "/no/such/file.pt",
    "deepspeed.zero_stage": 4, "deepspeed.offload_optimizer": "nvme", "deepspeed.offload_param": "cpu",
    "plan.gpu_mem": "twelve gigs", "plan.reserve": 1.0,
}
REPORTED_AS = {"teachers[0].base": "teachers[*].base"}  # "exactly one base" is a property of the list
UNBOUNDED = {
    "cache.dir": "any folder; created by `lowres-kd cache`",
    "teachers[0].model": "a free model name, checked by the family when it builds",
    "data.hflip": "a boolean: both values are allowed",
    "teachers[0].cache": "a boolean: both values are allowed",
    "student.grad_checkpointing": "a boolean: both values are allowed",
    "train.bf16": "a boolean: both values are allowed",
}


def wrong_type(tp):
    if typing.get_origin(tp) is typing.Union:
        return [[1]]
    if typing.get_origin(tp) in (list, typing.List, dict, typing.Dict):
        return 5
    return {bool: "yes", int: "many", float: "much", str: 123}[tp]


def set_key(data, section, key, value):
    if section == "":
        data[key] = value
    elif section == "teachers[0]":
        data["teachers"][0][key] = value
    else:
        data.setdefault(section, {})[key] = value


def hints(section):
    cls = {"": Recipe, "teachers[0]": TeacherConfig, **SECTIONS}[section]
    return typing.get_type_hints(cls)


def label(section, key):
    return f"{section}.{key}" if section else key


def errors_for(tmp_path, section, key, value) -> str:
    data = tiny_recipe_dict(tmp_path)
    set_key(data, section, key, value)
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    return str(info.value)


@pytest.mark.parametrize("section,key", all_keys(), ids=[label(*k) for k in all_keys()])
def test_wrong_type_names_the_key(tmp_path, section, key):
    message = errors_for(tmp_path, section, key, wrong_type(hints(section)[key]))
    assert f"{label(section, key)}: expected" in message or f"{label(section, key)}[0]: expected" in message, message


@pytest.mark.parametrize("section,key", all_keys(), ids=[label(*k) for k in all_keys()])
def test_misspelt_key_is_refused_with_a_suggestion(tmp_path, section, key):
    data = tiny_recipe_dict(tmp_path)
    target = data if section == "" else data["teachers"][0] if section == "teachers[0]" else data.setdefault(section, {})
    misspelt = key[:-1] + ("x" if key[-1] != "x" else "y")
    target[misspelt] = target.pop(key, "x")
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    message = str(info.value)
    assert f"{label(section, misspelt)}: unknown key (did you mean " in message, message
    assert "allowed: " in message and key in message.split("allowed: ")[1], message


@pytest.mark.parametrize("section,key", all_keys(), ids=[label(*k) for k in all_keys()])
def test_impossible_value_names_the_key_and_what_is_allowed(tmp_path, section, key):
    name = label(section, key)
    if name in UNBOUNDED:
        assert UNBOUNDED[name]
        return
    assert name in OUT_OF_RANGE, f"give {name} an out-of-range case (or list it in UNBOUNDED with the reason)"
    message = errors_for(tmp_path, section, key, OUT_OF_RANGE[name])
    reported = REPORTED_AS.get(name, name)
    lines = [line.strip() for line in message.splitlines() if line.strip().startswith((reported + ":", reported + "["))]
    assert lines, message
    assert any(word in lines[0] for word in ("allowed", "not found", "must")), message
