"""Benchmark training steps: what a careful user would run against the lowres-kd settings, in the
same run.

Each configuration trains a few steps of one recipe in a fresh subprocess (its own peak memory,
its own DeepSpeed process group) through the real trainer, and reads the trainer's log.csv. The
subprocess runs with the allocator setting ``lowres-kd`` gives itself (``lowres_kd/malloc.py``;
``LOWRES_KD_SYSTEM_MALLOC=1`` measures glibc's defaults):

  images/s      median over the steps after the first --warmup ones
  peak memory   GPU: torch.cuda.max_memory_allocated over the run (teachers, student, optimizer,
                activations: everything the process allocated). CPU: the process's peak RSS,
                Python and libraries included: only the ratios between rows mean anything

Configurations (recipe overrides):

  naive         the careful user's plain run: bf16 autocast on CUDA (``train.bf16``), bf16 teachers
                resident (bits 16, no offload), the eager PyTorch loss (kernels: torch), no gradient
                checkpointing, the plain torch engine with torch AdamW ``fused=True`` on CUDA
                (``foreach=True`` on CPU): no trick of this project, every trick of PyTorch's
  lowres-kd     non-base teachers int8 (and offloaded on CUDA), the fused loss (kernels: auto),
                gradient checkpointing, DeepSpeed ZeRO-2 with the optimizer on the CPU where
                DeepSpeed is installed, else the torch engine with 8-bit AdamW
  recipe        the recipe's own settings as written (what the planner says fits its
                ``plan.gpu_mem``); on CUDA the process is capped at that budget
                (``torch.cuda.set_per_process_memory_fraction``): an emulated 8 / 12 / 24 GB card
  live          the recipe's settings with every teacher run in the step (``teachers_from: live``)
  cache         the recipe's settings trained from a teacher-feature cache (``teachers_from:
                cache``, built first by ``lowres-kd cache``'s code in the same subprocess, its
                time reported apart and not in images/s; ``cache.epochs=1``), capped likewise;
                left out, with the reason, where the recipe cannot train from a cache
  hybrid        as cache, but the base teacher runs live (``cache: false``; in adapter mode the
                student's own forward with the adapter off)

Rows trained from a cache also report the build's images/s, bytes on disk per cached view and
the epochs after which the build has paid for itself against ``live`` (build time / time saved
per epoch).
  <budget>      on CUDA only (``--budgets``): lowres-kd with ``memory: auto`` planned for the budget
                and the process capped to it

Ratios are against naive. Targets (GPU): the 12 GB budget at >= 0.6x the throughput of the
unconstrained naive run, the 24 GB budget at >= 1.5x naive; reported as met / missed.

Weights: hub weights are replaced by random ones (``weights=none``), or with
``--random-weights DIR`` by random-weight local files (the path an offline user takes; written
once into DIR and reused). ``--images DIR`` trains on random images written there instead of the
recipe's data (the embedded photos are fewer than a 64-image batch). ``--max-seconds`` stops
starting new configurations once spent (and bounds each one's timeout), so a budgeted run still
writes its files.

Writes train[_<tag>]_<device>.json / .md / .png under --out.

    python benchmarks/bench_train.py                                  # defaults for this machine
    python benchmarks/bench_train.py --recipe recipes/vitb_dinov2_clip_sam_24gb.yaml --steps 12
    python benchmarks/bench_train.py --recipe recipes/demo_cpu.yaml --configs live cache hybrid --steps 6 --tag cache
    python benchmarks/bench_train.py --recipe recipes/vitb_dinov2_clip_sam_12gb.yaml --configs naive recipe cache \\
        --budgets --random-weights /tmp/w --images /tmp/img --tag 12gb
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import gc
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from lowres_kd.config import load_recipe  # noqa: E402
from lowres_kd.malloc import keep_freed_env  # noqa: E402
from lowres_kd.provenance import environment, write_results  # noqa: E402
from lowres_kd.units import parse_bytes  # noqa: E402

GPU_RECIPE = REPO / "recipes" / "vitb_dinov2_clip_sam_24gb.yaml"
CPU_RECIPE = REPO / "recipes" / "demo_cpu.yaml"
# a tiny CPU run: the demo's real shipped teachers at 64 px
CPU_OVERRIDES = ["data.image_size=64", "space.calibration_images=8", "space.head_hidden=128", "data.fashion_mnist=8",
                 "train.batch_size=4", "train.grad_accum=1"]
GPU_BUDGETS = ["8GiB", "12GiB", "24GiB"]
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None  # int8 teachers, 8-bit AdamW
CONFIGS = ("naive", "lowres-kd", "recipe", "live", "cache", "hybrid")
TARGETS = {"12GiB": ("throughput vs naive >= 0.6", 0.6), "24GiB": ("throughput vs naive >= 1.5", 1.5)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=None, help="recipe to train (default: the 24 GB recipe on CUDA, "
                   "the CPU demo at 64 px on CPU); hub weights are replaced by random ones (speed and memory do not "
                   "depend on them)")
    p.add_argument("--steps", type=int, default=None, help="steps per configuration (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of images/s")
    p.add_argument("--budgets", nargs="*", default=None, help="emulated GPU memory budgets (CUDA only; default 8/12/24GiB)")
    p.add_argument("--configs", nargs="*", default=["naive", "lowres-kd"], choices=CONFIGS,
                   help="configurations besides the budgets")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override for every row")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: no configuration starts once spent; each one's timeout ends with it")
    p.add_argument("--random-weights", type=Path, default=None, metavar="DIR",
                   help="hub weights -> random-weight local files in DIR (default: weights=none, built in memory)")
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="train on random images written into DIR (default: the recipe's data)")
    p.add_argument("--tag", default=None, help="output name part: train_<tag>_<device>.*")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one configuration (JSON) in this process
    return p


# ------------------------------------------------------------------------------ configurations
def _teacher_overrides(recipe, bits: int, offload: bool) -> List[str]:
    out = []
    for i, t in enumerate(recipe.teachers):
        adapter_base = t.base and recipe.student.mode == "adapter"  # the student itself: stays as it is
        out += [f"teachers.{i}.bits={16 if adapter_base else bits}", f"teachers.{i}.offload={offload and not adapter_base}",
                f"teachers.{i}.min_fidelity=0.0"]  # random weights: fidelity is not what is measured here
        if t.weights == "hub":
            out.append(f"teachers.{i}.weights=none")
    if recipe.student.weights == "hub":
        out.append("student.weights=none")
    return out


def _engine_overrides(cuda: bool) -> List[str]:
    from lowres_kd.engine_config import deepspeed_installed

    if cuda and deepspeed_installed():
        return ["engine=deepspeed", "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu", "optim.name=adamw"]
    return ["engine=torch", "optim.name=adamw8bit" if HAS_BITSANDBYTES else "optim.name=adamw"]


def _as_written_overrides(recipe) -> List[str]:
    """The recipe's own settings; only hub weights replaced (random) and fidelity floors off."""
    out = [f"teachers.{i}.min_fidelity=0.0" for i in range(len(recipe.teachers))]
    out += [f"teachers.{i}.weights=none" for i, t in enumerate(recipe.teachers) if t.weights == "hub"]
    return out + (["student.weights=none"] if recipe.student.weights == "hub" else [])


def _hybrid_live(recipe) -> int:
    """The teacher a hybrid row runs live: the base (in adapter mode its targets are the student's
    own forward with the adapter off), else the first one."""
    return next((i for i, t in enumerate(recipe.teachers) if t.base), 0)


def cache_supported(recipe_path: Path, overrides: List[str]) -> Optional[str]:
    """None where the recipe can train from a teacher-feature cache, else why not."""
    try:
        load_recipe(recipe_path, [*overrides, "teachers_from=cache"])
    except (ValueError, TypeError, KeyError) as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return None


def configurations(recipe, cuda: bool, names: List[str], budgets: List[str]) -> List[Dict]:
    naive = ["memory=manual", "engine=torch", "optim.name=adamw", "loss.kernels=torch", "student.grad_checkpointing=false",
             "train.bf16=true", *_teacher_overrides(recipe, 16, False)]
    bits = 8 if HAS_BITSANDBYTES else 16  # without bitsandbytes: bf16 teachers, said in the note
    lowres = ["loss.kernels=auto", "student.grad_checkpointing=true", *_teacher_overrides(recipe, bits, cuda),
              *_engine_overrides(cuda)]
    own_budget = recipe.plan.gpu_mem if cuda else None  # the card the recipe was written for
    rows = []
    if "naive" in names:  # torch AdamW fused=True (CUDA) / foreach=True (CPU): set in the worker
        rows.append({"name": "naive", "overrides": naive, "budget": None, "optimizer": "torch-best"})
    if "lowres-kd" in names:
        rows.append({"name": "lowres-kd", "overrides": ["memory=manual", *lowres], "budget": None})
    if "recipe" in names:
        rows.append({"name": f"recipe @ {recipe.plan.gpu_mem}" if cuda else "recipe",
                     "overrides": _as_written_overrides(recipe), "budget": own_budget})
    at = f" @ {recipe.plan.gpu_mem}" if cuda else ""
    if "live" in names:
        rows.append({"name": f"live{at}", "overrides": [*_as_written_overrides(recipe), "teachers_from=live"],
                     "budget": own_budget})
    if "cache" in names:
        rows.append({"name": f"cache{at}", "overrides": [*_as_written_overrides(recipe), "teachers_from=cache",
                                                         "cache.epochs=1"], "budget": own_budget, "cache": True})
    if "hybrid" in names:
        rows.append({"name": f"hybrid{at}", "overrides": [*_as_written_overrides(recipe), "teachers_from=cache",
                                                          "cache.epochs=1", f"teachers.{_hybrid_live(recipe)}.cache=false"],
                     "budget": own_budget, "cache": True})
    for b in budgets:
        rows.append({"name": f"lowres-kd @ {b}", "overrides": [*lowres, "memory=auto", f"plan.gpu_mem={b}"], "budget": b})
    return rows


# ------------------------------------------------------------------------------ one configuration
def best_torch_adamw(optimizer: torch.optim.Optimizer, cuda: bool) -> torch.optim.Optimizer:
    """The same parameter groups under torch's fastest AdamW for the device: ``fused=True`` on
    CUDA (one kernel for all parameters), ``foreach=True`` on CPU (fused AdamW on CPU exists but
    is not what a careful CPU user gains from)."""
    groups = [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay", "betas", "eps")}
              for g in optimizer.param_groups]
    fast = {"fused": True} if cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], **fast)


def _cap(budget: Optional[str]) -> None:
    if budget and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_bytes(budget) / total))


def run_worker(spec: Dict) -> Dict:
    """Train one configuration in this process; the record the parent collects."""
    # torch and lowres_kd load in the worker only: the parent holds no CUDA context or cap of its own
    from lowres_kd.launch import trainer_for
    from lowres_kd.training.trainer import TrainingOutOfMemory

    _cap(spec["budget"])
    record: Dict = {}
    try:
        if spec.get("cache"):  # build the cache with the same settings, teachers live; timed apart
            from lowres_kd.cache import build_cache

            live = [o for o in spec["overrides"] if not o.startswith("teachers_from=")]
            t0 = time.perf_counter()
            report = build_cache(load_recipe(spec["recipe"], live), progress=False)
            record["cache_build_s"] = time.perf_counter() - t0
            record["cache_bytes"] = report.get("bytes")
            record["cache_views"] = report["images"] * report["views"]
            record["cache_images"] = report["images"]
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()  # the training rows' peak is the training's
        recipe = load_recipe(spec["recipe"], spec["overrides"])
        trainer = trainer_for(recipe, progress=False).setup()
        if spec.get("optimizer") == "torch-best" and trainer.engine.name == "torch":
            trainer.engine.optimizer = best_torch_adamw(trainer.engine.optimizer, torch.cuda.is_available())
        optimizer = type(trainer.engine.optimizer).__name__ + "".join(
            f", {k}" for k in ("fused", "foreach") if trainer.engine.optimizer.defaults.get(k))
        trainer.train()
    except (TrainingOutOfMemory, torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if "out of memory" not in str(exc) and "no settings that fit" not in str(exc):
            raise
        return {**record, "fits": False, "error": str(exc).splitlines()[0][:300]}
    with (trainer.recipe.run_dir / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    timed = [float(r["images_per_s"]) for r in rows[spec["warmup"]:]] or [float(r["images_per_s"]) for r in rows]
    plan = trainer.plan.as_dict() if trainer.plan is not None else None
    return {**record, "fits": True, "images_per_s": statistics.median(timed),
            "peak_mem_gib": max(float(r["peak_mem_gib"]) for r in rows),
            "steps": len(rows), "engine": trainer.engine.describe(), "optimizer": optimizer, "plan": plan,
            "settings": {"batch_size": trainer.recipe.train.batch_size, "grad_accum": trainer.recipe.train.grad_accum,
                         "grad_checkpointing": trainer.recipe.student.grad_checkpointing,
                         "bf16": trainer.bf16, "kernels": trainer.recipe.loss.kernels,
                         "teachers_from": trainer.recipe.teachers_from,
                         "bits": [t.bits for t in trainer.recipe.teachers],
                         "offload": [t.offload for t in trainer.recipe.teachers]}}


def run_config(spec: Dict, timeout: float) -> Dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # carried packages stay
    env = keep_freed_env(os.environ) or dict(os.environ)  # the allocator ``lowres-kd train`` runs with
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout),
                              env={**env, "PYTHONPATH": path})
    except subprocess.TimeoutExpired:
        return {"fits": False, "error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"fits": False, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------ report
def _budget_key(budget: Optional[str]) -> str:
    """``12GB`` / ``12GiB`` / ``12 GiB`` -> the TARGETS key ``12GiB`` (an emulated card is named either way)."""
    found = re.match(r"\s*(\d+)", budget or "")
    return f"{found.group(1)}GiB" if found else ""


def add_ratios(rows: List[Dict]) -> None:
    naive = next((r for r in rows if r["name"] == "naive" and r["fits"]), None)
    for r in rows:
        if naive and r["fits"]:
            r["throughput_vs_naive"] = r["images_per_s"] / naive["images_per_s"]
            r["memory_vs_naive"] = r["peak_mem_gib"] / naive["peak_mem_gib"]
        target = TARGETS.get(_budget_key(r["budget"]))
        if target and "throughput_vs_naive" in r:
            r["target"], r["target_met"] = target[0], r["throughput_vs_naive"] >= target[1]


def add_cache_economics(rows: List[Dict]) -> None:
    """For rows trained from a cache: its build's images/s, bytes on disk per cached view, and the
    training epochs after which the build has paid for itself against the live row
    (build seconds / seconds saved per epoch; None where the cache row is not faster)."""
    live = next((r for r in rows if r["name"].startswith("live") and r["fits"]), None)
    for r in rows:
        if not (r.get("cache_build_s") and r["fits"]):
            continue
        r["cache_build_images_per_s"] = r["cache_views"] / r["cache_build_s"]
        r["cache_bytes_per_view"] = r["cache_bytes"] / max(r["cache_views"], 1)
        if live:
            r["speedup_vs_live"] = r["images_per_s"] / live["images_per_s"]
            saved = r["cache_images"] / live["images_per_s"] - r["cache_images"] / r["images_per_s"]
            r["break_even_epochs"] = r["cache_build_s"] / saved if saved > 0 else None


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def write_markdown(path: Path, env: Dict, rows: List[Dict], note: str) -> None:
    lines = [f"# Training step: naive vs lowres-kd ({env['device_name']})", "",
             f"torch {env['torch']}, deepspeed {env['deepspeed']}, bitsandbytes {env['bitsandbytes']}, "
             f"git {env['git_sha']}", "", note, "",
             "| configuration | fits | images/s | peak GiB | throughput vs naive | memory vs naive | engine | target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = f"{r['target']}: {'met' if r['target_met'] else 'missed'}" if "target" in r else ""
        fits = "yes" if r["fits"] else (r.get("error", "")[:80] if r.get("skipped") else "no: " + r.get("error", "")[:80])
        engine = r.get("engine", "") + (f"; {r['optimizer']}" if r.get("optimizer") else "")
        lines.append(f"| {r['name']} | {fits} | "
                     f"{_fmt(r.get('images_per_s'))} | {_fmt(r.get('peak_mem_gib'))} | {_fmt(r.get('throughput_vs_naive'))} | "
                     f"{_fmt(r.get('memory_vs_naive'))} | {engine} | {target} |")
    cached = [r for r in rows if r.get("cache_build_images_per_s")]
    if cached:
        lines += ["", "| trained from | images/s vs live | cache build images/s | bytes per cached view | "
                      "paid off after (epochs) |", "|---|---|---|---|---|"]
        for r in cached:
            lines.append(f"| {r['name']} | {_fmt(r.get('speedup_vs_live'))} | {_fmt(r['cache_build_images_per_s'])} | "
                         f"{r['cache_bytes_per_view']:,.0f} | {_fmt(r.get('break_even_epochs'), '.1f')} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, env: Dict, rows: List[Dict], note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["fits"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "images_per_s", "images/s"), (axes[1], "peak_mem_gib", "peak memory (GiB)")):
        ax.barh([r["name"] for r in ok], [r[key] for r in ok], color="tab:blue")
        ax.set_xlabel(label)
        ax.invert_yaxis()
    fig.suptitle(f"training step, {env['device_name']} ({note[:100]})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return {}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    env = environment(device, REPO, modules=("deepspeed", "bitsandbytes", "triton"))
    recipe_path = args.recipe or (GPU_RECIPE if cuda else CPU_RECIPE)
    steps = args.steps or (10 if cuda else 3)
    budgets = GPU_BUDGETS if args.budgets is None and cuda else (args.budgets or [])
    if budgets and not cuda:
        raise SystemExit("--budgets emulate a smaller GPU: they need CUDA")
    extra = [] if args.recipe or cuda else CPU_OVERRIDES
    t0 = time.perf_counter()
    if args.random_weights:  # hub weights -> random-weight local files (the offline user's path)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from recipe_inputs import random_weight_overrides

        extra = extra + random_weight_overrides(load_recipe(recipe_path, extra + args.overrides), args.random_weights)
    if args.images:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from recipe_inputs import image_overrides

        extra = extra + image_overrides(load_recipe(recipe_path, extra + args.overrides), args.images, steps)
    base = load_recipe(recipe_path, extra + args.overrides)
    note = (f"{recipe_path.name}, {steps} steps per row, images/s = median after {args.warmup} warm-up step(s); "
            "naive = bf16 autocast (CUDA), eager loss, torch AdamW fused (CUDA) / foreach (CPU)"
            + ("; hub weights: random local files" if args.random_weights else "; hub weights: random (weights=none)")
            + ("" if cuda else "; CPU: peak memory is the whole process's RSS, only the ratios mean anything")
            + ("" if HAS_BITSANDBYTES else "; no bitsandbytes: lowres-kd teachers stay bf16"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in configurations(base, cuda, args.configs, budgets):
            overrides = [*extra, *args.overrides, *spec["overrides"], f"train.steps={steps}",
                         f"train.checkpoint_every={steps + 1}", f"output_dir={tmp}/{len(rows)}"]
            left = None if args.max_seconds is None else args.max_seconds - (time.perf_counter() - t0)
            why = cache_supported(recipe_path, overrides) if spec.get("cache") else None
            if why:
                record = {"fits": False, "skipped": True, "error": f"skipped: no cache training for this recipe ({why})"}
            elif left is not None and left <= 5:
                record = {"fits": False, "skipped": True, "error": "skipped: --max-seconds spent"}
            else:
                record = run_config({**spec, "recipe": str(recipe_path), "overrides": overrides, "warmup": args.warmup},
                                    args.timeout if left is None else min(args.timeout, left))
            rows.append({**spec, **record, **env})
            print(f"{spec['name']}: " + (f"{record['images_per_s']:.2f} images/s, {record['peak_mem_gib']:.2f} GiB"
                                         if record["fits"] else f"no result ({record.get('error')})"), flush=True)
    add_ratios(rows)
    add_cache_economics(rows)
    name = f"train_{args.tag}" if args.tag else "train"
    stem = write_results(args.out, name, env, {"env": env, "note": note, "recipe": str(recipe_path), "rows": rows},
                         lambda path: write_markdown(path, env, rows, note), lambda path: write_plot(path, env, rows, note))
    return {"env": env, "rows": rows, "files": [str(stem.with_suffix(s)) for s in (".json", ".md", ".png")]}


if __name__ == "__main__":
    main()
