"""Hostile use of the command line: every user error is one line, ``lowres-kd: error: ...``, exit 2.

A tiny run is trained once for the module (about 10 s on 2 cores) and copied for each case; its
files are then damaged the ways a disk, a copy or a user damage them, for ``load``, ``probe``,
``export`` and ``train --resume``.
"""
import copy
import json
import shutil

import pytest
import yaml

import lowres_kd
from helpers import tiny_recipe_dict
from lowres_kd.cli import main
from lowres_kd.rundir import checkpoint as ckpt

ONE_TEACHER = [{"name": "mobilenet", "family": "mobilenet_v2", "input_size": 64, "base": True}]


def tiny(run_dir, **train):
    return tiny_recipe_dict(run_dir, teachers=copy.deepcopy(ONE_TEACHER), space={"calibration_images": 4, "head_hidden": 32},
                            train={"steps": 2, "batch_size": 2, "checkpoint_every": 1, **train},
                            data={"image_size": 64, "fashion_mnist": 4},
                            probe={"probes": ["fidelity"], "fidelity_images": 2})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny(root / "run")))
    assert main(["train", str(recipe), "--no-progress"]) == 0
    return root / "run"


@pytest.fixture
def run(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def one_line_error(capsys, code, argv, needle=""):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [line for line in err.splitlines() if line.startswith("lowres-kd: error:")]
    assert lines and "Traceback" not in err, err
    assert needle in err, err  # a recipe report goes on with one problem per line
    return lines[0]


# ----------------------------------------------------------------------------- damage
def truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def flip_data(file):
    data = bytearray(file.read_bytes())
    data[-100] ^= 0xFF
    file.write_bytes(bytes(data))


def flip_header(file):
    data = bytearray(file.read_bytes())
    data[12] ^= 0xFF  # inside the JSON header that follows the 8-byte length
    file.write_bytes(bytes(data))


def garble(file):
    file.write_text("{not json")


def empty(file):
    file.write_bytes(b"")


def wrong_json(file):
    file.write_text(json.dumps([1, 2, 3]))


DAMAGE = {"truncate": ("model.safetensors", truncate), "flip_data": ("model.safetensors", flip_data),
          "flip_header": ("model.safetensors", flip_header), "garble_state": ("state.json", garble),
          "empty_state": ("state.json", empty), "list_state": ("state.json", wrong_json),
          "delete_model": ("model.safetensors", lambda f: f.unlink())}


def damage_all(run, name):
    file, how = DAMAGE[name]
    for folder in [run / "model"] + ckpt.step_checkpoints(run):
        how(folder / file)


@pytest.mark.parametrize("name", DAMAGE)
def test_damaged_run_is_refused_by_load_export_and_probe(run, capsys, name, tmp_path):
    damage_all(run, name)
    with pytest.raises(ckpt.BadCheckpoint):
        lowres_kd.load(run)
    capsys.readouterr()
    one_line_error(capsys, 2, ["export", str(run), str(tmp_path / "b.safetensors")], "no readable checkpoint")
    assert not list(tmp_path.glob(".*tmp"))
    one_line_error(capsys, 2, ["probe", str(run), "--no-progress", "--device", "cpu"], "")


@pytest.mark.parametrize("name", ["truncate", "flip_data", "garble_state", "delete_model"])
def test_damaged_checkpoints_are_refused_by_resume(run, capsys, tmp_path, name):
    damage_all(run, name)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny(run, steps=3)))
    one_line_error(capsys, 2, ["train", str(recipe), "--resume", "--no-progress"], "no readable checkpoint")


def test_flipped_byte_is_named_and_load_falls_back(run, capsys):
    flip_data(run / "model" / "model.safetensors")
    model = lowres_kd.load(run)
    err = capsys.readouterr().err
    assert "model.safetensors is damaged: its sha256" in err and "step_0000002" in err and "instead" in err
    assert model is not None
    with pytest.raises(ckpt.BadCheckpoint, match="is damaged"):
        lowres_kd.load(run / "model")  # a checkpoint given itself: no fallback


def test_checkpoint_without_hashes_still_loads(run):
    state = run / "model" / "state.json"
    meta = json.loads(state.read_text())
    del meta["sha256"]
    state.write_text(json.dumps(meta))
    lowres_kd.load(run / "model")


def test_moved_run_resumes(run, capsys, tmp_path):
    moved = tmp_path / "moved"
    run.rename(moved)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny(moved, steps=3)))
    assert main(["train", str(recipe), "--resume", "--no-progress"]) == 0, capsys.readouterr().err
    assert "resumed from" in capsys.readouterr().out + "" or ckpt.latest_checkpoint(moved).name == "step_0000003"


@pytest.mark.parametrize("where", ["model/model.safetensors", "checkpoints/x.safetensors", "model"])
def test_export_refuses_the_runs_own_folders(run, capsys, where):
    before = (run / "model" / "model.safetensors").read_bytes()
    one_line_error(capsys, 2, ["export", str(run), str(run / where)])
    assert (run / "model" / "model.safetensors").read_bytes() == before
    lowres_kd.load(run / "model")


def test_export_refuses_a_folder_and_an_existing_file_without_force(run, capsys, tmp_path):
    one_line_error(capsys, 2, ["export", str(run), str(tmp_path)], "is a folder")
    out = tmp_path / "b.safetensors"
    out.write_bytes(b"keep")
    one_line_error(capsys, 2, ["export", str(run), str(out)], "--force")
    assert out.read_bytes() == b"keep"
    assert main(["export", str(run), str(out), "--force"]) == 0
    assert out.stat().st_size > 1000 and not list(tmp_path.glob(".*.tmp"))


def test_export_to_an_unwritable_place(run, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(capsys, 2, ["export", str(run), str(blocker / "b.safetensors")], "cannot write")
    assert not list(tmp_path.rglob(".*.tmp"))


def test_not_a_run_and_debug_shows_the_traceback(capsys, tmp_path):
    one_line_error(capsys, 2, ["export", str(tmp_path), str(tmp_path / "b.safetensors")], "neither a checkpoint")
    with pytest.raises(ckpt.NoCheckpoint):
        main(["--debug", "export", str(tmp_path), str(tmp_path / "b.safetensors")])
    with pytest.raises(ckpt.NoCheckpoint):
        main(["export", str(tmp_path), str(tmp_path / "b.safetensors"), "--debug"])


def test_recipe_errors_are_one_report(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    data = tiny(tmp_path / "run")
    data["train"]["stepz"] = 3
    data["optim"]["lr"] = float("inf")
    data["train"]["batch_size"] = 10**16
    recipe.write_text(yaml.safe_dump(data))
    rc = main(["validate", str(recipe)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for needle in ("3 problem(s)", "train.stepz: unknown key", "optim.lr: expected a finite number",
                   "train.batch_size: 10000000000000000 is not allowed; an integer >= 1 and <= 65536"):
        assert needle in err, err


def test_duplicate_key_and_negative_index(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny(tmp_path / "run")) + "name: again\n")
    one_line_error(capsys, 2, ["validate", str(recipe)], "duplicate key 'name'")
    recipe.write_text(yaml.safe_dump(tiny(tmp_path / "run")))
    one_line_error(capsys, 2, ["validate", str(recipe), "--set", "teachers.-1.weight=1"], "negative list index")


def test_empty_folder_fails_validate(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    recipe = tmp_path / "r.yaml"
    data = tiny(tmp_path / "run")
    data["data"]["source"] = str(tmp_path / "empty")
    recipe.write_text(yaml.safe_dump(data))
    for command in ("validate", "train"):
        rc = main([command, str(recipe)])
        err = capsys.readouterr().err
        assert rc == 2 and "holds no image file" in err and "Traceback" not in err, err


def test_weights_refused_by_weights_only(capsys, tmp_path):
    import pickle
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(object()))
    recipe = tmp_path / "r.yaml"
    data = tiny(tmp_path / "run")
    data["teachers"][0]["weights"] = str(evil)
    recipe.write_text(yaml.safe_dump(data))
    one_line_error(capsys, 2, ["train", str(recipe), "--no-progress"], "weights_only")


def test_oversized_plan_is_refused_with_the_bound(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny(tmp_path / "run")))
    one_line_error(capsys, 2, ["plan", str(recipe), "--gpu-mem", "12GiB", "--set", "data.image_size=1000000000000"],
                   "at most 8192")
    one_line_error(capsys, 2, ["plan", str(recipe), "--gpu-mem", "1e400GiB"], "--gpu-mem")


def _folder(folder, n_bad, n_good):
    from PIL import Image
    from skimage import data as skdata
    folder.mkdir()
    for i in range(n_bad):
        (folder / f"a_bad_{i}.jpg").write_bytes(b"" if i % 2 else b"junk")
    for i in range(n_good):
        Image.fromarray(skdata.chelsea()).resize((72, 64)).save(folder / f"b_good_{i}.png")


def test_first_images_unreadable_trains_and_lists_them(capsys, tmp_path):
    _folder(tmp_path / "images", 5, 4)
    recipe = tmp_path / "r.yaml"
    data = tiny(tmp_path / "run", steps=1)
    data["data"]["source"] = str(tmp_path / "images")
    recipe.write_text(yaml.safe_dump(data))
    assert main(["train", str(recipe), "--no-progress"]) == 0, capsys.readouterr().err
    log = (tmp_path / "run" / "bad_images.log").read_text()
    assert log.startswith("calibration: 5 of 5 images unreadable") and "a_bad_0.jpg" in log


def test_mostly_bad_folder_is_one_line_with_counts(capsys, tmp_path):
    _folder(tmp_path / "images", 6, 1)
    recipe = tmp_path / "r.yaml"
    data = tiny(tmp_path / "run")
    data["data"]["source"] = str(tmp_path / "images")
    recipe.write_text(yaml.safe_dump(data))
    one_line_error(capsys, 2, ["train", str(recipe), "--no-progress"], "only 1 of 7 images are readable, 2 needed")
    assert "a_bad_0.jpg" in (tmp_path / "run" / "bad_images.log").read_text()
