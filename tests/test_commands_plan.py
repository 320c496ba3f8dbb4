"""``lowres-kd plan``: the table, --json, and the exit code when nothing fits."""
import json

import yaml

from helpers import tiny_recipe_dict
from lowres_kd.cli import main


def recipe_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "run")))
    return str(path)


def test_plan_prints_the_table(tmp_path, capsys):
    assert main(["plan", recipe_file(tmp_path), "--gpu-mem", "12GiB", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| component | on cpu | in CPU memory | when | detail |" in out
    assert "| teacher weights: edges |" in out and "**total (peak)**" in out and "**fits**" in out


def test_plan_json_parses(tmp_path, capsys):
    assert main(["plan", recipe_file(tmp_path), "--gpu-mem", "8GB", "--json", "--world-size", "2",
                 "--set", "engine=torch"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["gpu_mem_bytes"] == 8 * 10**9 and plan["world_size"] == 2
    assert plan["device_type"] == "cuda" and plan["engine"] == "torch"
    rows = {c["name"]: c for c in plan["components"]}
    assert rows["CUDA context"]["device_bytes"] == 512 * 2**20
    assert rows["engine buffers (torch)"]["device_bytes"] > 0  # two ranks: the all-reduce copy
    phase = {p: sum(c["device_bytes"] for c in plan["components"] if c["phase"] == p)
             for p in ("always", "reserve", "targets", "teachers", "step", "optimizer")}
    assert phase["optimizer"] > 0 and phase["reserve"] == int(0.1 * 8 * 10**9)
    assert plan["device_total_bytes"] == phase["always"] + phase["reserve"] + max(
        phase["targets"] + phase["teachers"], phase["targets"] + phase["step"], phase["optimizer"])


def test_plan_that_cannot_fit_exits_1(tmp_path, capsys):
    assert main(["plan", recipe_file(tmp_path), "--gpu-mem", "1MiB", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "nothing fits" in captured.err


def test_plan_needs_a_size_without_a_gpu(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["plan", recipe_file(tmp_path)]) == 2
    assert "--gpu-mem" in capsys.readouterr().err
    assert main(["plan", recipe_file(tmp_path), "--gpu-mem", "twelve"]) == 2
