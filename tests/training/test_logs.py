"""Run logs: log.csv and TensorBoard scalars hold the same numbers, also across a resume."""
import math
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import read_log, train_to_end
from lowres_kd.errors import UserError
from lowres_kd.training.logs import RunLogs, tensorboard_tag
from lowres_kd.training.trainer import Trainer


def scalars(log_dir) -> dict:
    """Every TensorBoard scalar of a run as {tag: {step: value}}, as TensorBoard itself reads them."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        out[tag] = {e.step: e.value for e in events.Scalars(tag)}
    return out


def rows_for(steps, offset=0.0):
    return [{"step": s, "lr": 0.1 * s, "loss": 1.0 / s + offset, "edges/dense": 2.0 * s + offset,
             "images_per_s": 8.0} for s in steps]


def test_tensorboard_after_a_resume_holds_each_step_once(tmp_path):
    """A resume from step 2 purges the events a killed run wrote after it, as log.csv drops rows."""
    first = RunLogs(tmp_path, ["csv", "tensorboard"])
    for r in rows_for([1, 2, 3]):
        first.write(r)
    first.close()
    resumed = RunLogs(tmp_path, ["csv", "tensorboard"], keep_until=2)
    for r in rows_for([3, 4], offset=10.0):
        resumed.write(r)
    resumed.close()
    expected = rows_for([1, 2]) + rows_for([3, 4], offset=10.0)
    got = scalars(tmp_path / "tensorboard")
    assert set(got) == {"loss/total", "train/lr", "loss/edges/dense", "train/images_per_s"}
    for r in expected:
        for key in ("lr", "loss", "edges/dense"):
            assert got[tensorboard_tag(key)][r["step"]] == pytest.approx(r[key], rel=1e-6)
    assert [int(r["step"]) for r in read_log(tmp_path)] == [1, 2, 3, 4]


def test_training_writes_every_logged_number_to_tensorboard(tiny_recipe):
    recipe = tiny_recipe(train={"steps": 3, "log": ["csv", "tensorboard"], "checkpoint_every": 100})
    train_to_end(recipe)
    rows = read_log(recipe.run_dir)
    got = scalars(recipe.run_dir / "tensorboard")
    for name in ("mobilenet", "effnet", "edges"):
        assert f"loss/{name}/global" in got and f"loss/{name}/dense" in got
    for r in rows:
        for key, value in r.items():
            if key != "step" and value and math.isfinite(float(value)):
                assert got[tensorboard_tag(key)][int(r["step"])] == pytest.approx(float(value), rel=1e-6), key


def test_missing_tensorboard_stops_the_run_at_setup(tiny_recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were absent
    recipe = tiny_recipe(train={"log": ["csv", "tensorboard"]})
    with pytest.raises(UserError, match="pip install tensorboard"):
        Trainer(recipe, progress=False).setup()
    assert not (recipe.run_dir / "log.csv").exists()
