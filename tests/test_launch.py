"""``memory: auto``: training applies the planner's settings for the budget, keeps the effective
batch, records the plan in run.json, and resumes with the same plan."""
import json

import pytest

from lowres_kd.launch import trainer_for
from lowres_kd.planner import plan_recipe
from lowres_kd.rundir import checkpoint as ckpt


def test_memory_auto_trains_with_the_planned_settings(tiny_recipe):
    manual = tiny_recipe(train={"batch_size": 8, "steps": 2, "checkpoint_every": 1})
    roomy = 8 * 2**30
    full = plan_recipe(manual, roomy, device_type="cpu")
    assert full.fits and full.changes == {}
    need = full.device_total_bytes - full.reserve * roomy  # the recipe as written, without the reserve
    budget = int(need / (1 - full.reserve) * 0.85)  # 15 % short of what it needs
    expected = plan_recipe(manual, budget, device_type="cpu")
    assert expected.fits and expected.changes, expected.table()

    recipe = tiny_recipe(memory="auto", plan={"gpu_mem": f"{budget}B"},
                         train={"batch_size": 8, "steps": 2, "checkpoint_every": 1})
    trainer = trainer_for(recipe, progress=False).setup()
    trainer.train()
    applied = trainer.recipe
    for key, value in expected.changes.items():
        node = applied
        for part in key.split("."):
            node = node[int(part)] if isinstance(node, list) else getattr(node, part)
        assert node == value, key
    assert applied.train.batch_size * applied.train.grad_accum == 8  # the same optimisation problem
    run = json.loads((recipe.run_dir / "run.json").read_text())
    assert run["plan"]["changes"] == expected.changes and run["plan"]["fits"]
    # a resume re-plans from the same recipe: the same settings, accepted by the resume check
    longer = tiny_recipe(memory="auto", plan={"gpu_mem": f"{budget}B"},
                         train={"batch_size": 8, "steps": 3, "checkpoint_every": 1})
    resumed = trainer_for(longer, resume=True, progress=False).setup()
    assert resumed.step == 2 and resumed.recipe.train.batch_size == applied.train.batch_size
    resumed.train()
    assert ckpt.latest_checkpoint(recipe.run_dir).name == "step_0000003"


def test_memory_auto_refuses_an_impossible_budget(tiny_recipe):
    recipe = tiny_recipe(memory="auto", plan={"gpu_mem": "16MiB"})
    with pytest.raises(RuntimeError, match="no settings that fit"):
        trainer_for(recipe, progress=False).setup()
