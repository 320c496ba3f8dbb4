"""benchmarks/bench_qlora.py on a tiny adapter recipe (the shipped ViT-S/14 at 56 px): files written,
the base's bytes ordered by bits and matching the quantization, cosines ordered, ratios to 16-bit."""
import json

import pytest
import yaml

from helpers import load_benchmark, tiny_recipe_dict


@pytest.mark.slow
def test_bench_qlora_writes_a_table_ordered_by_bits(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRES_KD_GIT_SHA", "abc1234")
    data = tiny_recipe_dict(tmp_path / "run")
    data["teachers"] = [{"name": "dino", "family": "dinov2", "input_size": 56, "base": True, "min_fidelity": 0.5},
                        {"name": "edges", "family": "hed", "input_size": 64}]
    data["student"] = {"mode": "adapter", "lora_rank": 4}
    recipe = tmp_path / "qlora.yaml"
    recipe.write_text(yaml.safe_dump(data))
    bench = load_benchmark("bench_qlora")
    bench.main(["--recipe", str(recipe), "--out", str(tmp_path / "out"), "--steps", "2", "--images", "4",
                "--repeats", "1", "--tag", "tiny"])
    result = json.loads((tmp_path / "out" / "qlora_tiny_cpu.json").read_text())
    assert (tmp_path / "out" / "qlora_tiny_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "abc1234" in (tmp_path / "out" / "qlora_tiny_cpu.md").read_text()
    rows = {r["bits"]: r for r in result["rows"]}
    assert list(rows) == [16, 8, 4] and all(r["fits"] for r in rows.values())
    assert rows[16]["base_vs_fp32"] == pytest.approx(1.0) and rows[16]["cos_global"] == pytest.approx(1.0)
    assert 0.2 < rows[8]["base_vs_fp32"] < 0.3 and 0.1 < rows[4]["base_vs_fp32"] < 0.17  # ViT-S/14's linears
    assert rows[8]["cos_dense"] > 0.995 and rows[8]["cos_dense"] > rows[4]["cos_dense"] > 0.9
    assert rows[16]["student_step_peak_mib"] > rows[8]["student_step_peak_mib"] > rows[4]["student_step_peak_mib"]
    assert rows[16]["speed_vs_16"] == pytest.approx(1.0) and rows[4]["images_per_s"] > 0


def test_bench_qlora_refuses_a_full_mode_recipe(tmp_path):
    data = tiny_recipe_dict(tmp_path / "run")
    data["student"] = {"mode": "full"}
    recipe = tmp_path / "full.yaml"
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit, match="student.mode is 'full'; this benchmark needs an adapter-mode recipe"):
        load_benchmark("bench_qlora").main(["--recipe", str(recipe), "--out", str(tmp_path / "out")])
