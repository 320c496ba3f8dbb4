"""The two engines behind one loop: the real DeepSpeed (ZeRO 0-3, bf16, CPU AdamW offload) on
CPU with gloo, against the plain torch engine; 8-bit AdamW; resume through DeepSpeed's state.

DeepSpeed compiles its communication op on first use (about 30 s here) and its CPU AdamW for
the offload test (1-2 min); both are cached in ~/.cache/torch_extensions afterwards.
"""
import json

import pytest
import torch
from torch import nn

from helpers import logged_losses, train_to_end
from lowres_kd.rundir import checkpoint as ckpt
from lowres_kd.training.distributed import DistEnv
from lowres_kd.training.engines import ENGINES
from lowres_kd.training.trainer import NonFiniteLossError, Trainer

pytest.importorskip("deepspeed")


def engine_recipe(tiny_recipe, engine, **sections):
    """The shipped MobileNetV2 fully trained (every weight under ZeRO) against one frozen
    teacher (itself: the preservation term) and the HED edges."""
    teachers = [{"name": "mobilenet", "family": "mobilenet_v2", "input_size": 64, "base": True},
                {"name": "edges", "family": "hed", "input_size": 64}]
    train = {"steps": 3, "batch_size": 4, "grad_accum": 2, "checkpoint_every": 100, **sections.pop("train", {})}
    return tiny_recipe(engine=engine, teachers=teachers, student={"mode": "full"}, train=train,
                       optim={"lr": 1e-3, "warmup_steps": 1, "grad_clip": 1.0}, **sections)


@pytest.fixture(scope="module")
def torch_losses(tmp_path_factory):
    from helpers import tiny_recipe_dict
    from lowres_kd.config import recipe_from_dict

    def make(**sections):
        return recipe_from_dict(tiny_recipe_dict(tmp_path_factory.mktemp("torch") / "run", **sections))

    torch.manual_seed(0)
    return logged_losses(train_to_end(engine_recipe(make, "torch")).recipe.run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_zero_stages_match_the_torch_engine(tiny_recipe, torch_losses, stage):
    trainer = train_to_end(engine_recipe(tiny_recipe, "deepspeed", deepspeed={"zero_stage": stage}))
    assert trainer.engine.name == "deepspeed" and f"ZeRO-{stage}" in trainer.engine.describe()
    got = logged_losses(trainer.recipe.run_dir)
    assert len(got) == 3 and got[0] == pytest.approx(torch_losses[0], rel=1e-5)  # same data, same start
    assert got == pytest.approx(torch_losses, rel=2e-4), (got, torch_losses)  # and the same updates


@pytest.mark.slow
def test_deepspeed_cpu_adam_offload_matches_the_torch_engine(tiny_recipe, torch_losses):
    trainer = train_to_end(engine_recipe(tiny_recipe, "deepspeed", deepspeed={"zero_stage": 2, "offload_optimizer": "cpu"}))
    assert "DeepSpeedCPUAdam" in trainer.engine.describe() or "offload_optimizer cpu" in trainer.engine.describe()
    assert logged_losses(trainer.recipe.run_dir) == pytest.approx(torch_losses, rel=2e-4)


@pytest.mark.slow
def test_deepspeed_resume_continues_exactly(tiny_recipe, tmp_path):
    straight = engine_recipe(tiny_recipe, "deepspeed", output_dir=str(tmp_path / "straight"), train={"steps": 4})
    expected = logged_losses(train_to_end(straight).recipe.run_dir)
    broken = engine_recipe(tiny_recipe, "deepspeed", output_dir=str(tmp_path / "broken"),
                           train={"steps": 4, "checkpoint_every": 2})
    trainer = Trainer(broken, progress=False).setup()
    trainer.recipe.train.steps = 2  # stop after the first checkpoint, as a crash would
    trainer.train()
    assert (ckpt.latest_checkpoint(broken.run_dir) / "deepspeed").is_dir()
    resumed = engine_recipe(tiny_recipe, "deepspeed", output_dir=str(tmp_path / "broken"), train={"steps": 4})
    run_resumed = Trainer(resumed, resume=True, progress=False).setup()
    run_resumed.train()
    assert logged_losses(broken.run_dir) == pytest.approx(expected, rel=1e-6)
    # a checkpoint of one engine is not resumed by the other
    other = engine_recipe(tiny_recipe, "torch", output_dir=str(tmp_path / "broken"), train={"steps": 6})
    with pytest.raises(ValueError, match="engine"):
        Trainer(other, resume=True, progress=False).setup()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])  # stage 0 in fp32: the engine checks; stage 2: DeepSpeed does
def test_deepspeed_skips_non_finite_steps(tiny_recipe, monkeypatch, stage):
    recipe = engine_recipe(tiny_recipe, "deepspeed", deepspeed={"zero_stage": stage},
                           train={"steps": 5, "max_bad_steps": 2})
    trainer = Trainer(recipe, progress=False).setup()
    original, calls = trainer._loss_step, {"n": 0}

    def poisoned(*batch):
        calls["n"] += 1
        loss, terms = original(*batch)
        return (loss * float("nan") if calls["n"] > 2 else loss), terms  # one good step (2 micro-batches)

    monkeypatch.setattr(trainer, "_loss_step", poisoned)
    with pytest.raises(NonFiniteLossError, match="2 non-finite steps in a row"):
        trainer.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    assert all(torch.isfinite(p).all() for p in params)
    logged = logged_losses(recipe.run_dir)
    assert len(logged) == 3 and logged[0] > 0 and [str(v) for v in logged[1:]] == ["nan", "nan"]


class TinyModel(nn.Module):
    """The two submodules the DeepSpeed engine manages, and a normaliser-like buffer outside them."""

    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 16))
        self.heads = nn.ModuleDict({"t": nn.Linear(16, 8)})
        self.register_buffer("scale", torch.full((8,), 2.0))

    def loss(self, x, y):
        out = self.heads["t"](self.student(x.to(self.heads["t"].weight.dtype)))
        return (out.float() * self.scale - y).pow(2).mean()


CLIP = 1.0


def tiny_engine_losses(tiny_recipe, engine, bf16, stage=2, steps=6):
    recipe = tiny_recipe(engine=engine, deepspeed={"zero_stage": stage}, train={"grad_accum": 2, "batch_size": 4},
                         optim={"lr": 1e-2, "grad_clip": CLIP})
    torch.manual_seed(0)
    model = TinyModel()
    eng = ENGINES.get(engine)(recipe, model, torch.device("cpu"), DistEnv(), bf16)
    data = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 12, generator=data), torch.randn(4, 8, generator=data)) for _ in range(2 * steps)]
    out = []
    for step in range(steps):
        eng.set_lr(1e-2)
        total = 0.0
        for x, y in batches[2 * step:2 * step + 2]:
            loss = eng.forward(model.loss, x, y)
            eng.backward(loss, True)
            total += float(loss) / 2
        assert eng.step(True) is not None
        out.append(total)
    return out, model, eng


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_bf16_tracks_fp32_torch(tiny_recipe, stage):
    reference, _, _ = tiny_engine_losses(tiny_recipe, "torch", bf16=False)
    got, model, eng = tiny_engine_losses(tiny_recipe, "deepspeed", bf16=True, stage=stage)
    assert model.student[0].weight.dtype == torch.bfloat16  # DeepSpeed really runs the student in bf16
    saved = eng.model_state()["student.0.weight"]
    assert saved.dtype == torch.float32
    if stage >= 1:  # the fp32 master weights are saved, not the bf16 copies
        assert not torch.equal(saved, saved.bfloat16().float())
    assert model.scale.dtype == torch.float32  # what lies outside student/heads stays fp32
    assert got == pytest.approx(reference, rel=3e-2)
    assert got[-1] < got[0]


def test_adamw8bit_keeps_8bit_moments(tiny_recipe, tmp_path):
    pytest.importorskip("bitsandbytes")
    recipe = tiny_recipe(optim={"name": "adamw8bit"})
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
    eng = ENGINES.get("torch")(recipe, model, torch.device("cpu"), DistEnv(), False)
    weight = model[0].weight
    before = weight.detach().clone()
    eng.set_lr(1e-3)
    eng.backward(model(torch.randn(8, 512)).pow(2).mean(), True)
    assert eng.step(True) is not None
    state = eng.optimizer.state[weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert not torch.equal(weight, before)
    # its nested quantization state (one map shared by all parameters) survives a checkpoint
    eng.save(tmp_path)
    meta = json.loads(json.dumps({"optimizer": ckpt.optimizer_to_tensors(eng.optimizer.state_dict())[1]}))
    fresh = ENGINES.get("torch")(recipe, model, torch.device("cpu"), DistEnv(), False)
    fresh.load(tmp_path, model.state_dict(), meta)
    again = fresh.optimizer.state[weight]
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(again[key], state[key]), key
