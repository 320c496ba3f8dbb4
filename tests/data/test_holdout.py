"""data.holdout: source images that training and calibration never see, probed as ``probe.images: holdout``."""
import math

import pytest
import torch

from helpers import tiny_recipe_dict, tiny_recipe_from
from lowres_kd.build import training_images
from lowres_kd.config import RecipeError, recipe_from_dict
from lowres_kd.data import EmbeddedSource, EvalTransform, UnknownHoldout, split_holdout
from lowres_kd.probes import PROBES, ProbeContext
from lowres_kd.teachers import Features

HELD = ["skimage:rocket", "skimage:coffee", "sklearn:flower", "skimage:clock"]


@pytest.fixture(scope="module")
def photos():
    return EmbeddedSource(fashion_mnist=0)


def test_the_split_is_disjoint_complete_and_keeps_the_given_order(photos):
    train, held = split_holdout(photos, HELD)
    assert held.names() == HELD
    assert set(train.names()).isdisjoint(HELD) and len(train) + len(held) == len(photos)
    assert train.names() == [n for n in photos.names() if n not in HELD]  # the source's own order
    i = photos.names().index("skimage:coffee")
    assert held.load(1).tobytes() == photos.load(i).tobytes()
    same, none = split_holdout(photos, [])
    assert same is photos and len(none) == 0


def test_unknown_names_and_holding_out_everything_are_refused_by_name(photos):
    with pytest.raises(UnknownHoldout, match=r"data.holdout: 'skimage:eagle', 'x.jpg' not in the image source "
                                             r"\(23 items, e.g. skimage:astronaut"):
        split_holdout(photos, ["skimage:coffee", "skimage:eagle", "x.jpg"])
    with pytest.raises(UnknownHoldout, match="holds out all 23 images"):
        split_holdout(photos, photos.names())


def test_training_and_calibration_never_see_the_held_out_images(tmp_path):
    images = training_images(tiny_recipe_from(tmp_path / "run", data={"holdout": HELD}))
    assert len(images.source) == 23 - len(HELD) and not set(images.source.names()) & set(HELD)
    assert len(images.augmented) == len(images.calibration) == len(images.source)
    seen = {images.augmented.source.name(i) for i in range(len(images.augmented))}
    assert seen.isdisjoint(HELD) and images.calibration.source is images.source


def test_the_edge_probe_scores_exactly_the_held_out_images(tmp_path, photos):
    recipe = tiny_recipe_from(tmp_path / "run", data={"holdout": HELD}, probe={"images": "holdout", "edge_images": 16})
    seen = []

    def pixels(x):  # a real (if plain) dense feature: the pixels themselves
        seen.append(x)
        return Features(x.mean((2, 3)), x)

    ctx = ProbeContext(recipe=recipe, model=None, teachers={}, subjects={"pixels": pixels}, image_size=64,
                       device=torch.device("cpu"))
    (row,) = PROBES.get("edges")(ctx)
    assert (row["images"], row["n_fit"], row["n_eval"]) == ("holdout", 2, 2)  # all 4 held out, though 16 asked
    transform = EvalTransform(64)
    expected = torch.stack([transform(photos.load(photos.names().index(n))) for n in HELD])
    alternate = expected[torch.tensor([0, 2, 1, 3])]  # fitted on alternate images, scored on the others
    torch.testing.assert_close(torch.cat(seen), alternate, rtol=0, atol=0)
    assert math.isfinite(row["value"]) and row["value"] <= 1


def test_recipe_checks_name_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"probe.images: 'holdout' is not allowed; without data.holdout"):
        recipe_from_dict(tiny_recipe_dict(tmp_path / "run", probe={"images": "holdout"}))
    with pytest.raises(RecipeError, match=r"data.holdout: .*distinct image names"):
        recipe_from_dict(tiny_recipe_dict(tmp_path / "run", data={"holdout": ["skimage:coffee", "skimage:coffee"]}))
