"""Probes on tiny data: every registered probe runs on a real (tiny) run and writes the report."""
import json

import pytest
import torch

from lowres_kd.evaluation import run_probes
from lowres_kd.probes import PROBES
from lowres_kd.probes.edges import ridge_fit_score
from lowres_kd.training.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from helpers import tiny_recipe_dict
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
        if r["probe"] in ("knn", "segmentation"):
            assert 0 <= r["value"] <= 1
    seg = {(r["subject"], r["metric"]) for r in rows if r["probe"] == "segmentation"}
    assert seg == {(s, m) for s in subjects for m in ("miou", "pixel_accuracy")}
    assert {r["subject"] for r in rows if r["probe"] == "knn"} == subjects
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


def test_resolution_sweep_scores_each_size_and_matches_a_plain_run_at_its_own(tiny_run):
    plain = run_probes(tiny_run, probes=["linear", "knn"], progress=False)["rows"]
    swept = run_probes(tiny_run, probes=["linear", "knn"], sizes=[64, 48], progress=False)
    rows = swept["rows"]
    assert swept["sizes"] == [48, 64] and {r["image_size"] for r in rows} == {48, 64}
    at = lambda size: {(r["probe"], r["subject"]): r["value"] for r in rows if r["image_size"] == size}  # noqa: E731
    # at the run's own size (64 px) the sweep is the plain run, subject for subject
    assert at(64) == {(r["probe"], r["subject"]): r["value"] for r in plain}
    assert set(at(48)) == set(at(64))
    assert all(0 <= v <= 1 for v in at(48).values())
    assert (tiny_run / "resolution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tiny_run / "report.md").read_text()
    assert "![resolution](resolution.png)" in report and "linear (accuracy, fashion_mnist, 48 px)" in report


def test_swept_subjects_run_at_the_swept_size(tiny_run):
    from lowres_kd import load
    from lowres_kd.evaluation import build_subjects
    from lowres_kd.evaluation.runner import _recipe_of
    from lowres_kd.teachers import build_teacher

    model, recipe = load(tiny_run), _recipe_of(tiny_run)
    teachers = {t.name: build_teacher(t).freeze() for t in recipe.teachers}
    subjects = build_subjects(model, teachers, recipe, torch.device("cpu"), size=48)
    x = torch.rand(2, 3, 64, 64)
    body = model.student.body
    with torch.no_grad():
        expected = body.student_features(body.preprocess(x, 48))
        native = model.student(x)
        got = subjects["student"](x)
        init = subjects["student@init"](x)
        base = teachers[recipe.base_teacher.name]
    assert got.dense.shape == expected.dense.shape and got.dense.shape[-1] < native.dense.shape[-1]
    torch.testing.assert_close(got.global_, expected.global_)
    assert not torch.allclose(got.global_, native.global_)
    assert model.student.input_size == 64  # the run's own model is left at its size
    with torch.no_grad():
        torch.testing.assert_close(init.global_, base.student_features(base.preprocess(x, 48)).global_)


def test_a_token_student_is_resampled_on_a_copy(tiny_run):
    """set_input_size on a ViT (timm's position-table resampling), the original left as it was."""
    from lowres_kd.evaluation.runner import _backbone_at
    from lowres_kd.teachers import build_teacher
    from lowres_kd.teachers.base import small_random_config

    vit = build_teacher(small_random_config("timm")).freeze()  # vit_tiny_patch16 at 32 px
    wider = _backbone_at(vit, 64)
    x = torch.rand(2, 3, 64, 64)
    assert wider.student_features(wider.preprocess(x, 64)).dense.shape[-2:] == (4, 4)
    assert vit.student_features(vit.preprocess(x, 32)).dense.shape[-2:] == (2, 2)
    assert vit.net.pos_embed.shape[1] == 1 + 2 * 2 and wider.net.pos_embed.shape[1] == 1 + 4 * 4


@pytest.mark.parametrize("sizes", ["16", "64,64", "abc", "64,,96"])
def test_bad_sizes_are_refused_by_name(tiny_run, sizes, capsys):
    from lowres_kd.cli import main

    assert main(["probe", str(tiny_run), "--sizes", sizes, "--no-progress"]) == 2
    assert "--sizes:" in capsys.readouterr().err


def test_probe_settings_change_for_one_scoring(tiny_run, capsys):
    from lowres_kd.cli import main

    assert main(["probe", str(tiny_run), "--probes", "linear", "--data", "digits", "--set", "probe.train_per_class=4",
                 "--set", "probe.test_per_class=2", "--no-progress"]) == 0
    rows = json.loads((tiny_run / "probes.json").read_text())["rows"]
    assert {(r["n_train"], r["n_test"]) for r in rows} == {(40, 20)}  # digits: 10 classes
    capsys.readouterr()
    assert main(["probe", str(tiny_run), "--set", "train.steps=3", "--no-progress"]) == 2
    assert "--set train.steps=3: only probe.* settings change" in capsys.readouterr().err
    assert main(["probe", str(tiny_run), "--set", "probe.train_per_class=0", "--no-progress"]) == 2
    assert "probe.train_per_class" in capsys.readouterr().err
    assert main(["probe", str(tiny_run), "--set", "probe.no_such_key=1", "--no-progress"]) == 2
    assert "probe.no_such_key" in capsys.readouterr().err


def test_student_subjects_share_one_student_pass(tiny_run):
    """``student`` and every ``student->name`` come from one forward pass per batch, and equal
    what the student and its heads give on their own."""
    from lowres_kd.api import load
    from lowres_kd.evaluation.runner import _recipe_of, build_subjects
    from lowres_kd.probes import ProbeContext

    from lowres_kd.teachers import build_teacher

    model, recipe = load(tiny_run), _recipe_of(tiny_run)
    teachers = {t.name: build_teacher(t).freeze() for t in recipe.teachers}
    subjects = build_subjects(model, teachers, recipe, torch.device("cpu"))
    passes = []
    model.student.register_forward_hook(lambda *_: passes.append(1))
    ctx = ProbeContext(recipe=recipe, model=model, teachers=teachers, subjects=subjects, image_size=64,
                       device=torch.device("cpu"))
    images = torch.rand(37, 3, 64, 64)  # two batches of 32 and 5
    joint = ["student", *(f"student->{n}" for n in model.heads)]
    got = {name: ctx.features(name, "random", images) for name in joint}
    assert len(passes) == 2  # one student pass per batch for all four subjects
    with torch.no_grad():
        out = model(images)
    torch.testing.assert_close(got["student"].dense, out["dense"])
    for name in model.heads:
        torch.testing.assert_close(got[f"student->{name}"].global_, out["teachers"][name]["global"])
        torch.testing.assert_close(got[f"student->{name}"].dense, out["teachers"][name]["dense"])
    with torch.no_grad():
        torch.testing.assert_close(subjects["student->edges"](images[:3]).global_, out["teachers"]["edges"]["global"][:3])


def test_scratch_is_the_students_architecture_with_random_weights(tmp_path):
    """A shipped base whose model name is resolved (DINOv2 ``model: ""``: the shipped ViT-S, not
    the family's default ViT-L): scratch and student@init have the student's shapes."""
    from lowres_kd.build import build_model, build_student
    from lowres_kd.config import recipe_from_dict
    from lowres_kd.evaluation.runner import build_subjects
    from lowres_kd.teachers import build_teacher

    recipe = recipe_from_dict({
        "name": "vit", "output_dir": str(tmp_path / "run"),
        "teachers": [{"name": "dino", "family": "dinov2", "weights": "shipped", "input_size": 56, "base": True},
                     {"name": "edges", "family": "hed", "input_size": 56}],
        "data": {"image_size": 56, "fashion_mnist": 0}})
    student = build_student(recipe)
    teachers = {t.name: build_teacher(t).freeze() for t in recipe.teachers}
    model = build_model(recipe, student, {n: t.spec for n, t in teachers.items()})
    subjects = build_subjects(model, teachers, recipe, torch.device("cpu"))
    images = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        want = model.student(images)
        scratch, init = subjects["scratch"](images), subjects["student@init"](images)
    assert scratch.global_.shape == init.global_.shape == want.global_.shape == (2, 384)
    assert scratch.dense.shape == init.dense.shape == want.dense.shape
    assert not torch.allclose(scratch.global_, init.global_, atol=1e-2)  # random, not the base


@pytest.mark.parametrize("student", [{"mode": "adapter"},
                                     {"mode": "full", "family": "dinov2", "weights": "shipped", "input_size": 56}],
                         ids=["adapter", "full-other-family"])
def test_student_at_init_is_the_untrained_student(tmp_path, student):
    """``student@init`` is the backbone the student starts from: the base under an adapter (LoRA
    starts at zero; building the model's heads dry-runs the student, which must not move the
    frozen base's batch-norm statistics), the student's own family, weights and input size in full
    mode, not the base teacher."""
    from lowres_kd.build import build_model, build_student
    from lowres_kd.config import recipe_from_dict
    from lowres_kd.evaluation.runner import build_subjects
    from lowres_kd.teachers import build_teacher

    recipe = recipe_from_dict({
        "name": "init", "output_dir": str(tmp_path / "run"), "student": student,
        "teachers": [{"name": "mobilenet", "family": "mobilenet_v2", "weights": "shipped", "input_size": 64,
                      "base": True}, {"name": "edges", "family": "hed", "input_size": 64}],
        "data": {"image_size": 64, "fashion_mnist": 0}})
    model = build_model(recipe, build_student(recipe), {}).eval()
    teachers = {t.name: build_teacher(t).freeze() for t in recipe.teachers}
    subjects = build_subjects(model, teachers, recipe, torch.device("cpu"))
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        want, init = model.student(images), subjects["student@init"](images)
    torch.testing.assert_close(init.global_, want.global_, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(init.dense, want.dense, rtol=1e-4, atol=1e-5)
