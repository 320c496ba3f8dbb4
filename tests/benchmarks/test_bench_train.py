"""benchmarks/bench_train.py on CPU at tiny shapes: both configurations train through the real
trainer in subprocesses, and the files hold their measurements and ratios."""
import json

import pytest

from helpers import load_benchmark


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
    assert naive["optimizer"] == "AdamW, foreach" and naive["settings"]["kernels"] == "torch"
    assert "| naive | yes |" in md.read_text()


def test_naive_is_what_a_careful_user_runs_and_the_recipe_rows_are_capped():
    """No training: the rows' overrides. Naive = bf16 autocast, eager loss, no checkpointing, the
    torch engine whose AdamW the worker swaps for torch's fastest (fused on CUDA, foreach on CPU);
    the recipe and cache rows keep the recipe's settings and, on CUDA, its own budget."""
    import torch

    from lowres_kd.config import load_recipe

    bench = load_benchmark("bench_train")
    recipe = load_recipe(bench.REPO / "recipes" / "vitb_dinov2_clip_sam_12gb.yaml")
    rows = {r["name"]: r for r in bench.configurations(recipe, True, ["naive", "recipe", "cache"], [])}
    naive = rows["naive"]
    assert {"train.bf16=true", "loss.kernels=torch", "engine=torch", "student.grad_checkpointing=false"} <= set(naive["overrides"])
    assert naive["optimizer"] == "torch-best" and naive["budget"] is None
    assert rows["recipe @ 12GB"]["budget"] == "12GB" and rows["cache @ 12GB"]["cache"]
    assert "teachers_from=cache" in rows["cache @ 12GB"]["overrides"]
    assert not any(o.startswith(("teachers.0.bits", "engine=")) for o in rows["recipe @ 12GB"]["overrides"])
    assert bench._budget_key("12GB") == bench._budget_key("12GiB") == "12GiB"
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(2))]
    plain = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.05}, {"params": params[1:], "weight_decay": 0.0}],
                              lr=1e-3)
    fast = bench.best_torch_adamw(plain, cuda=False)
    assert fast.defaults["foreach"] is True and not fast.defaults.get("fused")
    assert [g["weight_decay"] for g in fast.param_groups] == [0.05, 0.0] and fast.param_groups[0]["params"] == params[:1]


@pytest.mark.slow
def test_live_and_hybrid_rows_train_and_say_when_the_cache_pays_off(tmp_path):
    bench = load_benchmark("bench_train")
    bench.main(["--out", str(tmp_path), "--steps", "2", "--warmup", "1", "--configs", "live", "hybrid",
                "--set", "cache.dtype=int8", "--set", "cache.rank=16", "--tag", "cache"])
    rows = {r["name"]: r for r in json.loads((tmp_path / "train_cache_cpu.json").read_text())["rows"]}
    live, hybrid = rows["live"], rows["hybrid"]
    assert live["fits"] and hybrid["fits"], (live, hybrid)
    assert live["settings"]["teachers_from"] == "live" and hybrid["settings"]["teachers_from"] == "cache"
    assert hybrid["cache_views"] == hybrid["cache_images"] > 0  # cache.epochs=1: one view an image
    assert hybrid["cache_bytes_per_view"] == hybrid["cache_bytes"] / hybrid["cache_views"]
    assert hybrid["speedup_vs_live"] == pytest.approx(hybrid["images_per_s"] / live["images_per_s"])
    assert "| hybrid |" in (tmp_path / "train_cache_cpu.md").read_text()


def test_cache_economics_against_the_live_row():
    bench = load_benchmark("bench_train")
    rows = [{"name": "live", "fits": True, "images_per_s": 10.0},
            {"name": "cache", "fits": True, "images_per_s": 40.0, "cache_build_s": 30.0, "cache_bytes": 4000,
             "cache_views": 400, "cache_images": 100},
            {"name": "hybrid", "fits": True, "images_per_s": 8.0, "cache_build_s": 30.0, "cache_bytes": 1,
             "cache_views": 100, "cache_images": 100}]
    bench.add_cache_economics(rows)
    cache, hybrid = rows[1], rows[2]
    assert cache["cache_build_images_per_s"] == pytest.approx(400 / 30) and cache["cache_bytes_per_view"] == 10
    assert cache["speedup_vs_live"] == 4.0
    assert cache["break_even_epochs"] == pytest.approx(30 / (100 / 10 - 100 / 40))  # 30 s / 7.5 s saved an epoch
    assert hybrid["break_even_epochs"] is None  # slower than live: never pays off
    assert "speedup_vs_live" not in rows[0]


def test_hybrid_runs_the_base_live():
    from lowres_kd.config import load_recipe

    bench = load_benchmark("bench_train")
    recipe = load_recipe(bench.REPO / "recipes" / "demo_cpu.yaml")
    rows = {r["name"]: r for r in bench.configurations(recipe, False, ["live", "cache", "hybrid"], [])}
    assert "teachers.0.cache=false" in rows["hybrid"]["overrides"] and recipe.teachers[0].base
    assert not any(".cache=false" in o for o in rows["cache"]["overrides"])
    assert "teachers_from=live" in rows["live"]["overrides"]
