"""Training on real shipped teachers: the loss falls, checkpoints round-trip, resume is exact."""
import json

import pytest
import torch

import lowres_kd
from helpers import read_log
from lowres_kd.cli import main
from lowres_kd.data import collate_images
from lowres_kd.rundir import checkpoint as ckpt
from lowres_kd.training.trainer import NonFiniteLossError, ResumeMismatch, Trainer, lr_at


@pytest.mark.slow
def test_short_run_lowers_the_loss(tiny_recipe):
    """On a fixed batch of real images (no augmentation), before and after 24 real steps."""
    recipe = tiny_recipe(train={"steps": 24, "checkpoint_every": 100}, optim={"lr": 5e-3, "warmup_steps": 2})
    trainer = Trainer(recipe, progress=False).setup()
    images, _ = collate_images([trainer.calibration[i] for i in range(8)])

    def fixed_batch_loss():
        trainer.model.eval()
        with torch.no_grad():
            return float(trainer._loss_step(images)[0])

    before = fixed_batch_loss()
    trainer.train()
    after = fixed_batch_loss()
    assert after < 0.9 * before, (before, after)
    rows = read_log(recipe.run_dir)
    assert len(rows) == 24
    for name in ("mobilenet", "effnet", "edges"):  # every per-teacher term is logged
        assert f"{name}/global" in rows[0] and f"{name}/dense" in rows[0]
    assert float(rows[-1]["images_per_s"]) > 0 and float(rows[-1]["peak_mem_gib"]) > 0


def test_resume_continues_exactly(tiny_recipe, tmp_path):
    straight = tiny_recipe(output_dir=str(tmp_path / "straight"))
    Trainer(straight, progress=False).setup().train()
    expected = [float(r["loss"]) for r in read_log(straight.run_dir)]

    broken = tiny_recipe(output_dir=str(tmp_path / "broken"), train={"steps": 4, "checkpoint_every": 2})
    trainer = Trainer(broken, progress=False).setup()
    trainer.recipe.train.steps = 2  # stop after the first checkpoint, as a crash would
    trainer.train()
    assert [p.name for p in ckpt.step_checkpoints(broken.run_dir)] == ["step_0000002"]
    resumed_recipe = tiny_recipe(output_dir=str(tmp_path / "broken"))
    Trainer(resumed_recipe, resume=True, progress=False).setup().train()
    got = [float(r["loss"]) for r in read_log(broken.run_dir)]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert [int(r["step"]) for r in read_log(broken.run_dir)] == [1, 2, 3, 4]


def test_resume_refuses_a_changed_objective_and_allows_memory_settings(tiny_recipe, tmp_path):
    first = tiny_recipe(output_dir=str(tmp_path / "r"), train={"steps": 2, "batch_size": 4, "checkpoint_every": 1})
    Trainer(first, progress=False).setup().train()
    changed = tiny_recipe(output_dir=str(tmp_path / "r"), loss={"alpha": 0.9}, train={"steps": 3})
    with pytest.raises(ResumeMismatch, match="loss.alpha: checkpoint has 0.5, recipe has 0.9"):
        Trainer(changed, resume=True, progress=False).setup()
    odd = tiny_recipe(output_dir=str(tmp_path / "r"), train={"steps": 3, "batch_size": 3})
    with pytest.raises(ResumeMismatch, match="8 images of epoch 0 are done, not a multiple of train.batch_size=3"):
        Trainer(odd, resume=True, progress=False).setup()
    halved = tiny_recipe(output_dir=str(tmp_path / "r"), train={"steps": 3, "batch_size": 2, "grad_accum": 2})
    trainer = Trainer(halved, resume=True, progress=False).setup()
    assert trainer.step == 2 and trainer.batches_done == 4  # same images done, smaller micro-batches
    trainer.train()


def test_checkpoint_round_trip_and_rotation(tiny_recipe):
    recipe = tiny_recipe(train={"steps": 6, "checkpoint_every": 1, "keep_last": 2})
    trainer = Trainer(recipe, progress=False).setup()
    trainer.train()
    names = [p.name for p in ckpt.step_checkpoints(recipe.run_dir)]
    assert names == ["step_0000005", "step_0000006"]
    tensors, meta = ckpt.read_dir(recipe.run_dir / "checkpoints" / "step_0000006", ["model", "optimizer", "rng"])
    state = trainer.model.state_dict()
    assert set(tensors["model"]) == set(state)
    assert all(torch.equal(tensors["model"][k], state[k].cpu()) for k in state)
    assert meta["step"] == 6 and meta["recipe"]["name"] == "tiny"
    # a run directory with checkpoints is never silently overwritten
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(recipe, progress=False).setup()


def test_interrupted_checkpoint_write_leaves_the_previous_one(tiny_recipe, monkeypatch):
    recipe = tiny_recipe(train={"steps": 2, "checkpoint_every": 1})
    trainer = Trainer(recipe, progress=False).setup()
    trainer.train()
    before = ckpt.latest_checkpoint(recipe.run_dir)

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", explode)
    trainer.step = 3
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert ckpt.latest_checkpoint(recipe.run_dir) == before
    assert not [p for p in (recipe.run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    ckpt.read_dir(before, ["model"])  # still loadable


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tiny_recipe, tmp_path):
    straight = tiny_recipe(output_dir=str(tmp_path / "straight"))
    Trainer(straight, progress=False).setup().train()
    expected = [float(r["loss"]) for r in read_log(straight.run_dir)]
    recipe = tiny_recipe(output_dir=str(tmp_path / "r"), train={"steps": 4, "checkpoint_every": 1, "keep_last": 3})
    trainer = Trainer(recipe, progress=False).setup()
    trainer.recipe.train.steps = 3
    trainer.train()
    newest = ckpt.latest_checkpoint(recipe.run_dir)
    (newest / "model.safetensors").write_bytes(b"truncated")  # as after a power cut
    resumed = Trainer(tiny_recipe(output_dir=str(tmp_path / "r"), train={"steps": 4, "checkpoint_every": 1,
                                                                         "keep_last": 3}), resume=True, progress=False)
    resumed.setup()
    assert resumed.step == 2
    resumed.train()
    assert [float(r["loss"]) for r in read_log(recipe.run_dir)] == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_non_finite_losses_skip_then_stop(tiny_recipe, monkeypatch):
    recipe = tiny_recipe(train={"steps": 6, "checkpoint_every": 1, "max_bad_steps": 3})
    trainer = Trainer(recipe, progress=False).setup()
    original = trainer._loss_step
    calls = {"n": 0}

    def poisoned(*batch):
        calls["n"] += 1
        loss, terms = original(*batch)
        return (loss * float("nan") if calls["n"] > 1 else loss), terms

    monkeypatch.setattr(trainer, "_loss_step", poisoned)
    params_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        trainer.train()
    # one good step happened, then nothing moved
    assert trainer.bad_steps == 3
    after = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(params_before[n], after[n]) for n in after)
    assert all(torch.isfinite(p).all() for p in after.values())
    # counted and logged; the checkpoint of the last good step is intact and loadable
    rows = read_log(recipe.run_dir)
    assert [r["skipped_steps"] for r in rows] == ["0", "1", "2", "3"] and rows[-1]["loss"] == "nan"
    assert ckpt.latest_checkpoint(recipe.run_dir).name == "step_0000001"
    lowres_kd.load(ckpt.latest_checkpoint(recipe.run_dir))


def test_non_finite_gradients_with_a_finite_loss_are_skipped(tiny_recipe):
    recipe = tiny_recipe(train={"steps": 3, "checkpoint_every": 100, "max_bad_steps": 2})
    trainer = Trainer(recipe, progress=False).setup()
    head = trainer.model.heads["effnet"].global_.out.weight
    head.register_hook(lambda grad: grad * float("inf"))  # as a bf16 overflow in backward would
    before = head.detach().clone()
    with pytest.raises(NonFiniteLossError, match="2 non-finite steps in a row"):
        trainer.train()
    assert torch.equal(head.detach(), before)  # no optimizer update reached the weights
    assert all(r["loss"] == "nan" for r in read_log(recipe.run_dir))


def test_lr_schedule_warms_up_then_decays(tiny_recipe):
    r = tiny_recipe(train={"steps": 100}, optim={"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1})
    lrs = [lr_at(s, r) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_load_contract(tiny_recipe):
    recipe = tiny_recipe(train={"steps": 2, "checkpoint_every": 100})
    trainer = Trainer(recipe, progress=False).setup()
    trainer.train()
    model = lowres_kd.load(recipe.run_dir)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images = torch.rand(2, 3, 80, 96)  # any size: the model resizes and normalises itself
    with torch.no_grad():
        out = model(images)
        ref = trainer.model.eval()(images)
    assert out["global"].shape == (2, 1280) and out["dense"].ndim == 4 and out["dense"].shape[0] == 2
    specs = json.loads((recipe.run_dir / "model" / "state.json").read_text())["specs"]
    assert set(out["teachers"]) == {"mobilenet", "effnet", "edges"}
    for name, o in out["teachers"].items():
        s = specs[name]
        assert o["global"].shape == (2, s["global_dim"])
        assert o["dense"].shape == (2, s["dense_dim"], *s["grid"])
        assert torch.allclose(o["dense"], ref["teachers"][name]["dense"], atol=1e-5)
        # outputs live in the teacher's raw space: normalising them gives the head's raw output
        heads = model.heads[name]
        g = heads.global_(out["global"])
        assert torch.allclose(model.norm_global[name](o["global"]), g, atol=1e-3, rtol=1e-3)
    assert lowres_kd.load(ckpt.latest_checkpoint(recipe.run_dir))(images)["global"].shape == (2, 1280)
    with pytest.raises(FileNotFoundError):
        lowres_kd.load(recipe.run_dir / "nothing")


def test_exported_backbone_is_the_adapted_student(tiny_recipe, tmp_path):
    import torchvision
    from safetensors.torch import load_file

    recipe = tiny_recipe(train={"steps": 2, "checkpoint_every": 100}, optim={"lr": 0.05, "warmup_steps": 1})
    Trainer(recipe, progress=False).setup().train()
    out = tmp_path / "backbone.safetensors"
    assert main(["export", str(recipe.run_dir), str(out)]) == 0
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(load_file(str(out)))  # plain torchvision keys, strict
    model = lowres_kd.load(recipe.run_dir)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        x = model.student.body.preprocess(images, model.student.input_size)
        ours = model.student(images).global_
        theirs = net.eval().features(x).mean((2, 3))
        base = model.student.base_features(images).global_
    # relative to the whole feature: at lr 0.05 the activations saturate ReLU6 and single entries
    # carry the merged weights' float32 rounding (5e-4 of 6), while the adapter moves them 15x
    relative = lambda a, b: float((a - b).norm() / b.norm())
    assert relative(ours, theirs) < 1e-4
    assert relative(ours, base) > 1e-1  # the merged adapter is in the weights


def test_cli_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out
    for sub in ("train", "probe", "cache", "export", "validate", "list"):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        assert "usage" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nteachers: []\ntrain: {steps: 0}\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err and "at least one teacher" in err
