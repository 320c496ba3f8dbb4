"""Property-based fuzzing of every shipped recipe: each mutation (delete, rename, wrong type, out
of range, non-finite, huge) is refused by a message naming the key, or accepted only with a value
that is valid. Validation only, no training; bounded and derandomized so CI is reproducible."""
import copy
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from lowres_kd.config import RecipeError, recipe_from_dict, safe_load_unique

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))
HUGE = [10**12, 10**16, 10**26, 2**63, 2**70, 1e300, 1e12]
NON_FINITE = [float("inf"), float("-inf"), float("nan")]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def leaves(node, path=()):
    """(path, value) of every key of a recipe, lists indexed."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,), v
            yield from leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, path + (i,))


def label(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def parent(data, path):
    node = data
    for p in path[:-1]:
        node = node[p]
    return node


BASE = {p.stem: safe_load_unique(p.read_text()) for p in RECIPES}
KEYS = [(stem, path) for stem, data in BASE.items() for path, _ in leaves(data) if not isinstance(path[-1], int)]


def mutate(kind, value, original):
    if kind == "wrong_type":
        return {str: 123, bool: "yes", int: "many", float: "much", list: 5, dict: [1]}.get(type(original), {"a": 1})
    if kind in ("huge", "non_finite", "out_of_range"):
        return value
    raise AssertionError(kind)


@FUZZ
@given(key=st.sampled_from(KEYS),
       kind=st.sampled_from(["delete", "rename", "wrong_type", "huge", "non_finite", "out_of_range"]),
       value=st.one_of(st.sampled_from(HUGE + NON_FINITE), st.integers(-10**20, 10**20),
                       st.floats(allow_nan=True, allow_infinity=True)))
def test_every_mutation_is_refused_by_key_or_valid(key, kind, value):
    stem, path = key
    data = copy.deepcopy(BASE[stem])
    node, leaf = parent(data, path), path[-1]
    original = node[leaf]
    name = label(path)
    if kind == "delete":
        del node[leaf]
    elif kind == "rename":
        node[leaf + "x"] = node.pop(leaf)
        name = label(path[:-1] + (leaf + "x",))
    else:
        if kind == "non_finite":
            value = NON_FINITE[abs(hash(str(value))) % 3] if not isinstance(value, float) or math.isfinite(value) else value
        node[leaf] = mutate(kind, value, original)
    try:
        recipe = recipe_from_dict(data, source=stem)
    except RecipeError as exc:
        message = str(exc)
        named = name if kind != "delete" else name
        # the key itself, or (for a value that breaks a rule between keys) the rule's own key
        assert named.split("[")[0] in message or name.rsplit(".", 1)[0] in message, message
        return
    # accepted: only a deletion of a defaulted key, or a value the key allows
    assert kind in ("delete", "huge", "out_of_range", "wrong_type"), (kind, name)
    if kind == "delete":
        return
    got = recipe.to_dict()
    for p in path:
        got = got[p]
    if isinstance(got, float):
        assert math.isfinite(got) and abs(got) <= 1e6, (name, got)
    if isinstance(got, int) and not isinstance(got, bool):
        assert abs(got) < 2**63 and (abs(got) <= 10**9 or name == "train.seed"), (name, got)


@pytest.mark.parametrize("stem", sorted(BASE))
def test_non_finite_refused_for_every_float_key(stem):
    data = BASE[stem]
    floats = [path for path, v in leaves(data) if isinstance(v, float)]
    assert floats or stem
    for path in floats:
        for bad in NON_FINITE:
            mutated = copy.deepcopy(data)
            parent(mutated, path)[path[-1]] = bad
            with pytest.raises(RecipeError, match="expected a finite number"):
                recipe_from_dict(mutated)


def test_all_problems_in_one_report(tmp_path):
    data = copy.deepcopy(BASE[sorted(BASE)[0]])
    data.setdefault("train", {})["stepz"] = 3  # unknown key
    data["train"]["batch_size"] = "eight"  # wrong type
    data.setdefault("loss", {})["alpha"] = 2.0  # impossible value
    data["loss"]["beta"] = float("inf")  # non-finite
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    message = str(info.value)
    assert "4 problem(s)" in message, message
    for key in ("train.stepz", "train.batch_size", "loss.alpha", "loss.beta"):
        assert key in message


def test_duplicate_yaml_key_refused():
    with pytest.raises(yaml.YAMLError, match="duplicate key 'steps'"):
        safe_load_unique("train:\n  steps: 1\n  steps: 2\n")
