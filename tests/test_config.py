"""Recipe loading: every problem named by its key, all reported at once; overrides; safe YAML."""
import copy
from pathlib import Path

import pytest
import yaml

from helpers import tiny_recipe_dict
from lowres_kd.config import RecipeError, load_recipe, recipe_from_dict

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


def _errors(data) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    return str(info.value)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.base_teacher.base
    assert path.read_text().startswith("#"), "every recipe opens with what it does and how to run it"


@pytest.mark.parametrize("section,key,value,needle", [
    ("train", "steps", 0, "train.steps: 0 is not allowed; an integer >= 1"),
    ("train", "steps", "ten", "train.steps: expected int"),
    ("train", "stepz", 3, "train.stepz: unknown key (did you mean 'steps'?)"),
    ("loss", "alpha", 1.5, "loss.alpha: 1.5 is not allowed; in [0, 1]"),
    ("loss", "distance", "cosine", "loss.distance: 'cosine' is not allowed; one of cos, cos_smoothl1, mse"),
    ("loss", "kernels", "cuda", "loss.kernels: 'cuda' is not allowed"),
    ("space", "normalizer", "phis", "space.normalizer: 'phis' is not allowed"),
    ("student", "mode", "lora", "student.mode: 'lora' is not allowed; one of adapter, full, scratch"),
    ("student", "grad_checkpointing", "yes", "student.grad_checkpointing: expected bool"),
    ("optim", "betas", [0.9], "optim.betas"),
    ("data", "source", "/nonexistent/folder", "data.source: '/nonexistent/folder' is not allowed"),
    ("probe", "probes", ["linear", "dino"], "probe.probes[1]: 'dino' is not allowed"),
])
def test_bad_values_name_the_key(tmp_path, section, key, value, needle):
    data = tiny_recipe_dict(tmp_path)
    data.setdefault(section, {})[key] = value
    assert needle in _errors(data)


def test_teacher_errors_and_all_problems_at_once(tmp_path):
    data = tiny_recipe_dict(tmp_path)
    data["teachers"][1]["family"] = "efficientnet"
    data["teachers"][2]["weights"] = str(tmp_path / "missing.pt")
    data["teachers"][2]["base"] = True
    data["train"]["batch_size"] = -1
    message = _errors(data)
    assert "teachers[1].family: 'efficientnet' is not allowed; one of" in message
    assert f"teachers[2].weights: file not found: {tmp_path / 'missing.pt'}" in message
    assert "exactly one teacher must have base: true" in message
    assert "train.batch_size" in message
    assert "5 problem(s)" in message and "a family that can be the student's base" in message


def test_base_must_be_a_family_that_can_be_the_student(tmp_path):
    data = tiny_recipe_dict(tmp_path)
    data["teachers"][0]["base"], data["teachers"][2]["base"] = False, True
    assert "teachers[2].family: 'hed' is not allowed; a family that can be the student's base: clip, dinov2, mobilenet_v2, sam, timm" \
        in _errors(data)


def test_missing_required_key(tmp_path):
    data = tiny_recipe_dict(tmp_path)
    del data["teachers"][0]["family"]
    assert "teachers[0].family: required key is missing" in _errors(data)


def test_overrides_and_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path)))
    r = load_recipe(path, ["train.steps=7", "teachers.1.weight=0.25", "loss.alpha=1"])
    assert r.train.steps == 7 and r.teachers[1].weight == 0.25 and r.loss.alpha == 1.0
    assert r.teacher_weight(r.teachers[0]) == pytest.approx(1 / 3)
    with pytest.raises(RecipeError, match="train.steps"):
        load_recipe(path, ["train.steps=-3"])
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(path, ["train.steps"])
    with pytest.raises(RecipeError, match="--set teachers.9.weight: no such list item"):
        load_recipe(path, ["teachers.9.weight=1"])
    with pytest.raises(RecipeError, match="teachers\\[0\\].name: 'loss' is not allowed; a name other than the log columns"):
        load_recipe(path, ["teachers.0.name=loss"])


def test_yaml_python_tags_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\nteachers: []\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_recipe_round_trips_through_dict(tmp_path):
    r = recipe_from_dict(tiny_recipe_dict(tmp_path))
    again = recipe_from_dict(copy.deepcopy(r.to_dict()))
    assert again == r
