"""benchmarks/bench_train.py on CPU at tiny shapes: both configurations train through the real
trainer in subprocesses, and the files hold their measurements and ratios."""
import json

import pytest

from conftest import load_benchmark


@pytest.mark.slow
def test_bench_train_cpu_writes_json_md_png(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRES_KD_GIT_SHA", "abc1234")
    bench = load_benchmark("bench_train")
    result = bench.main(["--out", str(tmp_path), "--steps", "2", "--warmup", "1"])
    js, md, png = (tmp_path / f"train_cpu.{ext}" for ext in ("json", "md", "png"))
    assert js.is_file() and md.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["name"]: r for r in json.loads(js.read_text())["rows"]}
    assert set(rows) == {"naive", "lowres-kd"} and [r["name"] for r in result["rows"]] == ["naive", "lowres-kd"]
    naive, lowres = rows["naive"], rows["lowres-kd"]
    assert naive["fits"] and lowres["fits"], (naive, lowres)
    assert naive["throughput_vs_naive"] == 1.0 and lowres["throughput_vs_naive"] > 0
    assert naive["images_per_s"] > 0 and lowres["peak_mem_gib"] > 0 and lowres["git_sha"] == "abc1234"
    # each row really trained with its settings
    assert naive["settings"]["grad_checkpointing"] is False and lowres["settings"]["grad_checkpointing"] is True
    assert naive["settings"]["bits"] == [16, 16, 16] and lowres["settings"]["bits"] == [16, 8, 8]  # base: the student
    assert naive["engine"].startswith("torch (adamw,") and lowres["engine"].startswith("torch (adamw8bit,")
    assert "| naive | yes |" in md.read_text()
