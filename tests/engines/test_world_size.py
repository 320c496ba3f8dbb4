"""World size 2 on CPU (gloo), launched by torchrun like a real multi-GPU run: both ranks take
their half of each global batch, and the logged losses equal one process on the whole batch."""
import csv
import os
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_recipe_dict
from lowres_kd.training.distributed import free_port


def losses(run_dir):
    with (run_dir / "log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def launch(tmp_path, name, nproc, engine, batch_size):
    data = tiny_recipe_dict(tmp_path / name, engine=engine, train={"steps": 3, "batch_size": batch_size,
                                                                   "checkpoint_every": 2})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "lowres_kd.cli", "train", str(path), "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path / name, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    two, out = launch(tmp_path, "two", 2, engine, batch_size=2)
    one, _ = launch(tmp_path, "one", 1, engine, batch_size=4)
    assert "world size 2" in out
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    # rank 0 alone wrote the run: one log, checkpoints with the whole run's data position
    import json

    state = json.loads((two / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["images_done"] == 2 * 2 * 2
    assert not list(two.parent.glob("two/checkpoints/.*"))
