"""benchmarks/cache_rank.py on the tiny recipe: files written, bytes and cosines ordered by rank."""
import json

import yaml

from helpers import load_benchmark, tiny_recipe_dict


def test_cache_rank_writes_an_ordered_table(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRES_KD_GIT_SHA", "abc1234")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "run")))
    bench = load_benchmark("cache_rank")
    bench.main([str(recipe), "--out", str(tmp_path / "out"), "--ranks", "4,32", "--dtypes", "int8",
                "--fit-images", "16", "--test-images", "8"])
    result = json.loads((tmp_path / "out" / "cache_rank_cpu.json").read_text())
    assert (tmp_path / "out" / "cache_rank_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(r["teacher"], r["rank"]): r for r in result["rows"]}
    full, r4, r32 = rows[("effnet", "full")], rows[("effnet", 4)], rows[("effnet", 32)]
    # int8: one byte a value and a 4-byte scale a row; global one row an image, dense one a token (2x2 grid)
    assert full["bytes_per_image"] == (1280 + 4) + 4 * (1280 + 4)
    assert r4["bytes_per_image"] == (4 + 4) + 4 * (4 + 4)
    assert r4["dense_cosine"] < r32["dense_cosine"] < full["dense_cosine"] <= 1.0 + 1e-6
    assert rows[("edges", 32)]["dense_width"] == 6 and rows[("edges", 32)]["dense_cosine"] > 0.999  # stored whole
