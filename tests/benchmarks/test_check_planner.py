"""benchmarks/check_planner.py on CPU, one small configuration: the planner against a real
training step, component by component (the script once broke unnoticed: this keeps it running)."""
import json

from helpers import load_benchmark


def test_check_planner_one_config_is_exact_where_it_should_be(tmp_path):
    check = load_benchmark("check_planner")
    assert check.main(["--device", "cpu", "--configs", "vit-tiny-full-64-b4", "--out", str(tmp_path)]) == 0
    (result,) = json.loads(next(tmp_path.glob("planner_*.json")).read_text())["configs"]
    rows = {r["component"]: r for r in result["rows"]}
    for exact in ("gradients", "optimizer state", "normalisers", "student trainable params", "heads params"):
        assert rows[exact]["error"] == 0.0, rows[exact]
    for close in ("kept for backward", "step peak (live bytes)"):
        assert abs(rows[close]["error"]) < 0.10, rows[close]
    assert next(tmp_path.glob("planner_*.md")).read_text().count("| normalisers |") == 1
