"""World size 2 on CPU (gloo), launched by torchrun like a real multi-GPU run: both ranks take
their half of each global batch, and the logged losses equal one process on the whole batch."""
import os
import subprocess
import sys

import pytest
import yaml

from helpers import logged_losses, tiny_recipe_dict
from lowres_kd.training.distributed import free_port


def launch(tmp_path, name, nproc, engine, batch_size):
    # standardize: phi-s fitted on 16 calibration images of 1280 channels is rank-deficient, its
    # rotation then depends on float noise (the calibration batch size differs between the runs)
    data = tiny_recipe_dict(tmp_path / name, engine=engine, train={"steps": 3, "batch_size": batch_size,
                                                                   "checkpoint_every": 2},
                            space={"normalizer": "standardize", "calibration_images": 16, "head_hidden": 128})
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
    assert logged_losses(two) == pytest.approx(logged_losses(one), rel=1e-4)
    # rank 0 alone wrote the run: one log, checkpoints with the whole run's data position
    import json

    state = json.loads((two / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["images_done"] == 2 * 2 * 2
    assert not list(two.parent.glob("two/checkpoints/.*"))


@pytest.mark.parametrize("world,bs,n,start", [(2, 3, 20, 0), (3, 2, 17, 6), (4, 1, 9, 4)])
def test_ranks_split_every_global_batch(world, bs, n, start):
    from lowres_kd.data.datasets import ResumableSampler

    full = ResumableSampler(n, seed=5)
    full.set_epoch(1)
    order = full.order()[start:]
    shards = []
    for rank in range(world):
        s = ResumableSampler(n, seed=5).shard(rank, world, bs)
        s.set_epoch(1)
        s.start_at(start)
        shards.append(list(s))
        assert len(s) == len(shards[-1])
    global_batches = (n - start) // (world * bs)
    for b in range(global_batches):  # rank r holds the r-th slice of global batch b, in order
        expected = order[b * world * bs:(b + 1) * world * bs]
        assert [i for r in range(world) for i in shards[r][b * bs:(b + 1) * bs]] == expected
    assert all(len(sh) == global_batches * bs for sh in shards)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(n).shard(world, world, bs)
