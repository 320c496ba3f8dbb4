"""benchmarks/ablation.py on a tiny real recipe: each mode trains, is probed, and the comparison
holds each run's own scores."""
import json

import pytest
import yaml

from helpers import load_benchmark, tiny_recipe_dict


def _tiny_recipe_file(tmp_path, monkeypatch):
    """The tiny recipe (2 steps, the linear probe only) as a file; the git sha fixed to abc1234."""
    monkeypatch.setenv("LOWRES_KD_GIT_SHA", "abc1234")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "unused", train={"steps": 2},
                                                      probe={"probes": ["linear"]})))
    return recipe


@pytest.mark.slow
def test_ablation_trains_each_mode_and_compares_them(tmp_path, monkeypatch):
    recipe = _tiny_recipe_file(tmp_path, monkeypatch)
    load_benchmark("ablation").main([str(recipe), "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"),
                                     "--modes", "adapter,scratch", "--no-progress"])
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| adapter | adapter |" in md and "| scratch | scratch |" in md and "git abc1234" in md
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    cells = []
    for mode, result in zip(["adapter", "scratch"], saved["results"]):
        probed = json.loads((tmp_path / "runs" / "tiny" / mode / "probes.json").read_text())
        assert result["rows"] == probed["rows"] and result["recipe"]["student"]["mode"] == mode
        score = {r["subject"]: r["value"] for r in probed["rows"]}
        cells.append(f"{score['student']:.3f} ({score['student'] - score['teacher:mobilenet']:+.3f})")
    assert f"| student | {cells[0]} | {cells[1]} |" in md
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert set(timings["seconds"]) == {"adapter", "scratch"} and timings["env"]["git_sha"] == "abc1234"


@pytest.mark.slow
def test_ablation_over_seeds_reports_the_spread_and_reuses_finished_runs(tmp_path, monkeypatch):
    recipe = _tiny_recipe_file(tmp_path, monkeypatch)
    args = [str(recipe), "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--modes", "adapter",
            "--seeds", "0,1", "--no-progress"]
    ablation = load_benchmark("ablation")
    ablation.main(args)
    runs = [tmp_path / "runs" / "tiny" / f"adapter-seed{s}" for s in (0, 1)]
    assert [json.loads((r / "probes.json").read_text())["recipe"]["train"]["seed"] for r in runs] == [0, 1]
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "## Spread over seeds" in md and "| adapter | 2 |" in md
    trained = [(r / "log.csv").stat().st_mtime_ns for r in runs]
    monkeypatch.setenv("LOWRES_KD_GIT_SHA", "def5678")
    ablation.main(args + ["--reuse"])  # both runs are done: nothing trains again, their sha stays
    assert [(r / "log.csv").stat().st_mtime_ns for r in runs] == trained
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())["seconds"]
    assert {t["git_sha"] for t in timings.values()} == {"abc1234"}
    assert "git abc1234:" in (tmp_path / "out" / "compare.md").read_text()
