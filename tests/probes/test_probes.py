"""Probes on tiny data: every registered probe runs on a real (tiny) run and writes the report."""
import json

import pytest
import torch

from lowres_kd.probes import PROBES, run_probes
from lowres_kd.probes.edges import ridge_fit_score
from lowres_kd.training.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import tiny_recipe_dict
    from lowres_kd.config import recipe_from_dict

    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path_factory.mktemp("probe") / "run", train={"steps": 2}))
    Trainer(recipe, progress=False).setup().train()
    return recipe.run_dir


def test_all_probes_and_report(tiny_run):
    result = run_probes(tiny_run, progress=False)
    rows = result["rows"]
    assert {r["probe"] for r in rows} == set(PROBES.list())
    subjects = {r["subject"] for r in rows if r["probe"] == "linear"}
    teachers = ("mobilenet", "effnet", "edges")
    assert subjects == {"student", "student@init", "scratch", *(f"teacher:{t}" for t in teachers),
                        *(f"student->{t}" for t in teachers)}
    for r in rows:
        if r["probe"] == "linear":
            assert 0 <= r["value"] <= 1 and r["n_train"] == 30 and r["n_test"] == 30
        if r["metric"].startswith("cos_"):
            assert -1 <= r["value"] <= 1
    edges = {r["subject"]: r["value"] for r in rows if r["probe"] == "edges"}
    # HED's own side outputs predict its edge map better than MobileNetV2's stride-32 map
    assert edges["teacher:edges"] > 0.3 and edges["teacher:edges"] > edges["teacher:mobilenet"] + 0.1
    report = (tiny_run / "report.md").read_text()
    assert "| student |" in report and "loss.png" in report and "probes.png" in report
    for png in ("loss.png", "probes.png"):
        assert (tiny_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tiny_run / "probes.json").read_text())["rows"] == rows


def test_ridge_probe_recovers_a_linear_map_and_rejects_noise():
    rows = 64
    x = torch.randn(8 * rows, 10, dtype=torch.float64)
    w = torch.randn(10, 1, dtype=torch.float64)
    y = x @ w + 0.05 * torch.randn(8 * rows, 1, dtype=torch.float64)
    assert ridge_fit_score(x[:6 * rows], y[:6 * rows], x[6 * rows:], y[6 * rows:], rows) > 0.95
    noise = torch.randn(8 * rows, 1, dtype=torch.float64)
    assert ridge_fit_score(x[:6 * rows], noise[:6 * rows], x[6 * rows:], noise[6 * rows:], rows) < 0.1
