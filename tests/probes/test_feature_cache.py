"""Features once: linear and knn share one pass of each subject over a set, in batches."""
import torch
import torch.nn.functional as F

from helpers import tiny_recipe_from
from lowres_kd.probes import PROBES, ProbeContext
from lowres_kd.teachers import Features


def test_linear_and_knn_share_one_feature_pass(tmp_path):
    recipe = tiny_recipe_from(tmp_path / "run", probe={"data": ["digits"], "train_per_class": 5, "test_per_class": 4})
    images_seen = {"pixels": 0}

    def pixels(x):  # a real (if simple) feature extractor: pooled pixels
        images_seen["pixels"] += len(x)
        return Features(F.adaptive_avg_pool2d(x, 4).flatten(1), x)

    ctx = ProbeContext(recipe=recipe, model=None, teachers={}, subjects={"pixels": pixels}, image_size=32,
                       device=torch.device("cpu"))
    rows = PROBES.get("linear")(ctx) + PROBES.get("knn")(ctx)
    assert images_seen["pixels"] == 50 + 40  # each image once, though two probes read it
    assert [(r["probe"], r["dataset"]) for r in rows] == [("linear", "digits"), ("knn", "digits")]
    assert all(r["value"] > 0.5 for r in rows)  # pooled digits are far from chance (0.1)
    assert ctx.features("pixels", "digits/train", None, dense=False).dense is None  # global only was kept
