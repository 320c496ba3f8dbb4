"""benchmarks/bench_teachers.py runs end to end on CPU with a tiny configuration and writes its files."""
import importlib.util
import json

import pytest

from helpers import load_benchmark


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_bench_teachers_cpu_writes_json_md_png(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRES_KD_GIT_SHA", "abc1234")
    bench = load_benchmark("bench_teachers")
    result = bench.main(["--device", "cpu", "--out", str(tmp_path), "--teachers", "vit_tiny_patch16_224", "mobilenet_v2",
                         "--img", "32", "--batch", "1", "--fidelity-images", "2", "--warmup", "0", "--repeats", "1"])
    js, md, png = (tmp_path / f"teachers_cpu.{ext}" for ext in ("json", "md", "png"))
    assert js.is_file() and md.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data == json.loads(json.dumps(result, default=str))
    rows = data["rows"]
    variants = ["16bit", "16bit+offload", "8bit", "8bit+offload", "4bit", "4bit+offload"]
    assert [(r["teacher"], r["variant"]) for r in rows] == [(t, v) for t in ("vit_tiny_patch16_224", "mobilenet_v2")
                                                            for v in variants]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["git_sha"] == "abc1234" and r["bitsandbytes"] and r["torch"] and r["device_name"]
        assert r["images_per_s"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    by = {(r["teacher"], r["variant"]): r for r in rows}
    vit = {v: by["vit_tiny_patch16_224", v] for v in variants}
    assert vit["16bit"]["baseline"] and vit["16bit"]["speed_vs_baseline"] == 1.0
    assert vit["16bit"]["cos_min"] == pytest.approx(1.0) and vit["16bit"]["weights_vs_fp32"] == 1.0
    assert vit["8bit"]["weights_vs_fp32"] < 0.3 and vit["4bit"]["weights_vs_fp32"] < 0.18
    assert vit["8bit"]["meets_cos_target"] and vit["4bit"]["meets_weight_target"]
    for v in ("16bit", "8bit", "4bit"):  # offload changes where weights live, not what is computed
        assert vit[v + "+offload"]["cos_global"] == vit[v]["cos_global"]
        assert vit[v + "+offload"]["offload_max_resident_blocks"] == 2
        assert vit[v + "+offload"]["device_weight_bytes"] < vit[v]["device_weight_bytes"]
    mob = by["mobilenet_v2", "8bit"]
    assert mob["n_quantized"] == 1 and mob["meets_weight_target"] is False and mob["meets_cos_target"] is None
    text = md.read_text()
    assert "| vit_tiny_patch16_224 | 16bit (baseline) |" in text and "**no**" in text and "bitsandbytes 0." in text


def test_bench_teachers_budget_skips_but_still_writes(tmp_path):
    bench = load_benchmark("bench_teachers")
    result = bench.main(["--device", "cpu", "--out", str(tmp_path), "--teachers", "vit_tiny_patch16_224", "--img", "32",
                         "--batch", "1", "--bits", "16", "4", "--offload", "off", "--max-seconds", "0"])
    assert [r["error"] for r in result["rows"]] == ["skipped: --max-seconds spent"] * 2
    assert (tmp_path / "teachers_cpu.md").is_file() and (tmp_path / "teachers_cpu.png").is_file()
