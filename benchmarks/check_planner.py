"""Check the memory planner's estimates against a real training step, component by component.

Each configuration runs in a fresh subprocess: the planner estimates the recipe (``estimate`` on
the meta-device profile, no search), then the real trainer sets it up and runs two training
steps, and the script measures

- exact bytes, by inspecting the live tensors: each teacher's weights (``lowmem.tensor_bytes``;
  an offloaded teacher: what stays on the device plus the most block bytes staged at once, and
  its blocks in CPU memory), the student's frozen and trainable parameters, gradients (after
  backward), optimizer state (after the step), heads (params + grads + optimizer), normalisers;
- activations of the second step through the trainer's own loss step, with the planner's
  ``LiveBytes`` on real tensors: bytes kept from forward to backward (targets + student + heads +
  loss; the planner's rows, summed) and the step's peak;
- the whole process: growth of the peak resident memory (CPU: ``VmHWM`` after a reset, else
  ``ru_maxrss``, with ``MALLOC_MMAP_THRESHOLD_`` set so big tensors are mmap'd and RSS follows live
  bytes; CUDA: ``torch.cuda.max_memory_allocated``) from before the trainer's setup to the end of
  the second step, less the decoded training images (measured apart: the planner does not count
  the data pipeline, which lives in CPU memory), against the planner's total less its reserve
  (and, on CUDA, less the context constant: the allocator does not see it; the context is
  measured there from ``cudaMemGetInfo``);
- images/s of the second step (the third is the measured one: the tracking mode slows it) against
  the planner's FLOP-based estimate at its default device speed.

On CPU the process row also holds what is not a tensor (Python objects of the modules, the
autograd graph, oneDNN's kernel caches, heap fragmentation of small tensors): the Markdown says
how much that is (RSS less the tensors counted exactly and the step's live bytes).

Error = estimate / measured - 1. Writes planner_<device>.json and .md under --out.

Recipe configurations (``recipe-8gb``, ``recipe-12gb``, ``recipe-24gb``: the three GPU recipes,
``recipes/vitb_dinov2_clip_sam_*gb.yaml``, as written; ``recipe-demo-64``: the CPU demo at 64 px,
for a quick run of the same path on CPU) train the recipe file itself, on the torch engine (the
meters read a torch optimizer's state; DeepSpeed's ZeRO partitions are not inspected here), with
hub weights replaced by random-weight local files (``--random-weights DIR``, written once; else
``weights=none``), random images where ``--images DIR`` is given, a few calibration images and the
fidelity floors off. On CUDA the process is capped at the recipe's budget with
``torch.cuda.set_per_process_memory_fraction`` (an emulated 8 / 12 / 24 GB card on a bigger GPU)
before anything is allocated: the planner's verdict (fits at that budget) is reported beside the
measured peak (``torch.cuda.max_memory_allocated``), and a step that runs out of memory under the
cap is recorded as such, not as a crash.

A configuration that fails is recorded (its error in the report) and the others still run;
``--max-seconds`` stops starting new configurations once spent and bounds each one's time; the
exit code is 1 when any configuration failed.

torch and lowres_kd are imported inside the functions a worker runs, never at the top: the parent
only spawns workers and reads their records, and a worker's memory settings (the mmap threshold,
the CUDA cap) must be in place before torch loads.

    .venv/bin/python benchmarks/check_planner.py                 # CPU: ~2 minutes on 2 cores
    .venv/bin/python benchmarks/check_planner.py --device cuda   # on a GPU machine
    python benchmarks/check_planner.py --device cuda --configs recipe-8gb,recipe-12gb,recipe-24gb \\
        --random-weights /tmp/w --images /tmp/img             # the GPU recipes at their budgets
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TEACHERS_64 = [{"name": "mobilenet", "family": "mobilenet_v2", "input_size": 64, "base": True},
               {"name": "effnet", "family": "efficientnet_lite0", "input_size": 64},
               {"name": "edges", "family": "hed", "input_size": 64}]
VIT_TINY = {"name": "vit", "family": "timm", "model": "vit_tiny_patch16_224", "weights": "none", "input_size": 64}

CONFIGS = {
    # the demo's teachers at 64 px, MobileNetV2 student with LoRA
    "mnv2-adapter-64-b4": {"teachers": TEACHERS_64, "size": 64, "batch": 4, "ckpt": False},
    "mnv2-adapter-96-b8-ckpt": {"teachers": TEACHERS_64, "size": 96, "batch": 8, "ckpt": True},
    # a timm ViT student trained in full, with the MobileNetV2 teacher
    "vit-tiny-full-64-b4": {"teachers": [{**VIT_TINY, "base": True}, {**TEACHERS_64[0], "base": False}],
                            "size": 64, "batch": 4, "ckpt": False, "mode": "full"},
    "vit-tiny-full-96-b8-ckpt": {"teachers": [{**VIT_TINY, "input_size": 96, "base": True},
                                              {**TEACHERS_64[0], "base": False, "input_size": 96}],
                                 "size": 96, "batch": 8, "ckpt": True, "mode": "full"},
    # a quantized, offloaded ViT teacher next to the MobileNetV2 student
    "mnv2-adapter-vit-int8-offload": {"teachers": [TEACHERS_64[0], {**VIT_TINY, "model": "vit_small_patch16_224",
                                                                    "bits": 8, "offload": True, "min_fidelity": 0.0}],
                                      "size": 64, "batch": 4, "ckpt": False, "needs": ("bitsandbytes",)},
    # recipe files as written (see the module docstring); the GPU ones at their own budget
    **{f"recipe-{gb}gb": {"recipe": f"recipes/vitb_dinov2_clip_sam_{gb}gb.yaml", "device": "cuda"} for gb in (8, 12, 24)},
    "recipe-demo-64": {"recipe": "recipes/demo_cpu.yaml",
                       "overrides": ["data.image_size=64", "teachers.0.input_size=64", "teachers.1.input_size=64",
                                     "teachers.2.input_size=64", "space.head_hidden=128", "data.fashion_mnist=8",
                                     "train.batch_size=4", "train.grad_accum=1"]},
}
GPU_RECIPE_CONFIGS = [f"recipe-{gb}gb" for gb in (8, 12, 24)]


def recipe_dict(name: str, cfg: dict, run_dir: str, device: str) -> dict:
    return {"name": name, "output_dir": run_dir, "teachers": cfg["teachers"], "engine": "torch",
            "student": {"mode": cfg.get("mode", "adapter"), "grad_checkpointing": cfg["ckpt"]},
            "space": {"calibration_images": 8, "head_hidden": 128},
            "data": {"image_size": cfg["size"], "fashion_mnist": 8},
            "optim": {"warmup_steps": 1},
            "train": {"steps": 2, "batch_size": cfg["batch"], "checkpoint_every": 100, "device": device}}


def config_of(name: str) -> dict:
    """A named configuration, or ``file:PATH``: any recipe file, checked like the recipe-* ones."""
    if name.startswith("file:"):
        return {"recipe": str(Path(name[5:]).resolve())}
    return CONFIGS[name]


def recipe_from_file(name: str, cfg: dict, run_dir: str, device: str, options: dict):
    """A recipe-file configuration with the check's overrides (module docstring)."""
    from lowres_kd.config import load_recipe

    path = REPO / cfg["recipe"]
    common = [*cfg.get("overrides", []), "engine=torch", "memory=manual", "space.calibration_images=8",
              "train.steps=2", "train.grad_accum=1", "train.checkpoint_every=100", f"train.device={device}",
              f"output_dir={run_dir}", "optim.warmup_steps=1"]
    first = load_recipe(path, common)
    extra = [f"teachers.{i}.min_fidelity=0.0" for i in range(len(first.teachers))]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from recipe_inputs import image_overrides, random_weight_overrides

    if options.get("random_weights"):
        extra += random_weight_overrides(first, Path(options["random_weights"]))
    else:
        extra += [f"teachers.{i}.weights=none" for i, t in enumerate(first.teachers) if t.weights == "hub"]
        extra += ["student.weights=none"] if first.student.weights == "hub" else []
    if options.get("images"):
        extra += image_overrides(first, Path(options["images"]), steps=4)
    return load_recipe(path, [*common, *extra]), [*common, *extra]


def _cap_to_budget(recipe) -> int:
    """CUDA: cap this process at the recipe's ``plan.gpu_mem``; the budget in bytes (else 2^40)."""
    import torch

    from lowres_kd.units import parse_bytes

    if not torch.cuda.is_available():
        return 2**40
    budget = parse_bytes(recipe.plan.gpu_mem)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
    return budget


# ----------------------------------------------------------------------------- meters
class CpuMeter:
    """Resident memory of this process: now, and the peak since ``reset_peak``."""

    def __init__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
            self.resettable = True
        except OSError:
            self.resettable = False

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def current(self) -> int:
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        if self.resettable:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        return self._status("VmHWM") if self.resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def context(self) -> int:
        return 0


class CudaMeter:
    def __init__(self):
        import torch

        self.torch = torch
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        self._context = total - free - torch.cuda.memory_reserved()

    def current(self) -> int:
        return self.torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated()

    def context(self) -> int:
        return self._context


# ----------------------------------------------------------------------------- one configuration
def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.device, t.data_ptr(), t.numel(), t.dtype)
        if t.numel() and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _warm_up(device) -> None:
    """Load the kernels and thread pools a training step uses, so RSS growth is the model's."""
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.GELU(), torch.nn.Flatten(),
                              torch.nn.LayerNorm(8 * 30 * 30), torch.nn.Linear(8 * 30 * 30, 4)).to(device)
    opt = torch.optim.AdamW(net.parameters())
    for _ in range(2):
        net(torch.rand(2, 3, 32, 32, device=device)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.nn.functional.scaled_dot_product_attention(*(torch.rand(1, 2, 4, 8, device=device),) * 3)


def run_config(name: str, device_type: str, options: Optional[dict] = None) -> dict:
    import torch

    from lowres_kd.config import recipe_from_dict
    from lowres_kd.data import build_source
    from lowres_kd.lowmem import tensor_bytes
    from lowres_kd.planner import estimate, profile_recipe
    from lowres_kd.planner.memtrack import LiveBytes
    from lowres_kd.training.trainer import Trainer

    cfg = config_of(name)
    device = torch.device(device_type)
    with tempfile.TemporaryDirectory() as tmp:
        budget, overrides = 2**40, None
        if "recipe" in cfg:  # a recipe file, capped at its own budget on CUDA before anything is allocated
            recipe, overrides = recipe_from_file(name, cfg, str(Path(tmp) / "run"), device_type, options or {})
            budget = _cap_to_budget(recipe) if device_type == "cuda" else budget
        else:
            recipe = recipe_from_dict(recipe_dict(name, cfg, str(Path(tmp) / "run"), device_type))
        meter = CudaMeter() if device_type == "cuda" else CpuMeter()
        _warm_up(device)
        started = time.perf_counter()
        prof = profile_recipe(recipe, device_type, "torch")
        est = estimate(recipe, prof, budget)
        plan_seconds = time.perf_counter() - started
        verdict = {"budget_bytes": budget if budget < 2**40 else None, "estimated_total_bytes": est.device_total,
                   "planner_fits": est.device_total <= budget}
        planned = {c.name: (c.device, c.cpu) for c in est.components}

        rss = CpuMeter()  # the data pipeline lives in CPU memory whatever the device
        before = rss.current()
        source = build_source(recipe.data.source, fashion_mnist=recipe.data.fashion_mnist)
        data_bytes = max(0, rss.current() - before)
        del source

        base = meter.current()
        trainer = Trainer(recipe, progress=False).setup()
        engine, model = trainer.engine, trainer.model
        batches = trainer._batches()
        measured: Dict[str, int] = {}

        def step(track: bool):
            """One optimizer step of one micro-batch; (seconds, images, gradient bytes after backward)."""
            images, indices = next(batches)
            images = images.to(device)
            engine.set_lr(1e-4)
            live = LiveBytes()
            t0 = time.perf_counter()
            with live if track else contextlib.nullcontext():
                loss, _ = engine.forward(trainer._loss_step, images, indices)
                kept, forward_peak = live.current, live.peak
                live.reset_peak()
                engine.backward(loss, True)
            if track:
                measured["kept for backward"] = kept
                measured["step peak (live bytes)"] = max(forward_peak, live.peak)
            grads = _bytes(p.grad for p in model.parameters() if p.grad is not None)
            engine.step(True)
            return time.perf_counter() - t0, len(images), grads

        try:
            step(False)  # the optimizer state exists from here on
            seconds, n_images, _ = min(step(False) for _ in range(2))  # timed without the tracking mode
            verdict["measured_peak_bytes"] = meter.peak() if device_type == "cuda" else None  # setup + 3 steps
            meter.reset_peak()
            _, _, measured["gradients"] = step(True)
        except torch.cuda.OutOfMemoryError as exc:  # under the emulated card's cap: the planner was wrong
            verdict["measured_peak_bytes"] = meter.peak()
            trainer._release()
            return {"config": name, "recipe": cfg.get("recipe"), "overrides": overrides, "oom": str(exc).splitlines()[0],
                    **verdict, "rows": [], "notes": prof.notes}
        peak = meter.peak()

        student = model.student
        opt = engine.optimizer

        for tname, teacher in trainer.teachers.items():
            off = getattr(teacher, "lowmem_offload", None)
            if off is None:
                measured[f"teacher weights: {tname}"] = tensor_bytes(teacher)
            else:
                measured[f"teacher weights: {tname}"] = off.stats.resident_bytes + off.stats.max_resident_block_bytes
                measured[f"teacher weights: {tname} (CPU)"] = sum(off.stats.block_bytes)
        frozen = [p for p in student.parameters() if not p.requires_grad] + list(student.buffers())
        if recipe.student.mode == "adapter":
            measured["student frozen weights"] = _bytes(frozen)
        measured["student trainable params"] = _bytes(p for p in student.parameters() if p.requires_grad)
        measured["heads params"] = _bytes(model.heads.parameters())
        measured["optimizer state"] = _bytes(v for st in opt.state.values() for v in st.values()
                                             if torch.is_tensor(v) and v.dim() > 0)  # not AdamW's step counters
        measured["normalisers"] = _bytes(list(model.norm_global.buffers()) + list(model.norm_dense.buffers()))
        measured["process peak, less data"] = peak - base - (data_bytes if device_type == "cpu" else 0)
        step_rows = ("kept for backward", "step peak (live bytes)", "process peak, less data")
        persistent = sum(v for k, v in measured.items() if k not in step_rows) - measured["gradients"]
        tensors = persistent + measured["step peak (live bytes)"]  # the step's live bytes hold the new gradients
        trainer._release()

    # the planner's numbers for the same quantities
    kept_rows = ("teacher targets", "student activations", "head activations", "loss buffers")
    teacher_rows = [n for n in planned if n.startswith("teacher weights: ")]
    estimated = {n: planned[n][0] for n in teacher_rows if n in measured}
    estimated.update({f"{n} (CPU)": planned[n][1] for n in teacher_rows if f"{n} (CPU)" in measured})
    for n in ("student frozen weights", "student trainable params", "heads params", "gradients", "optimizer state",
              "normalisers"):
        if n in measured:
            estimated[n] = planned[n][0]
    estimated["kept for backward"] = sum(planned[n][0] for n in kept_rows)
    student_step = sum(planned[n][0] for n in ("student activations", "head activations", "loss buffers", "working memory"))
    teacher_forward = planned.get("teacher forward (no-grad peak)", (0, 0))[0]
    estimated["step peak (live bytes)"] = planned["teacher targets"][0] + max(student_step, teacher_forward)
    context = planned.get("CUDA context", (0, 0))[0]
    offloaded = est.cpu_total if device_type == "cpu" else 0  # on CPU the offloaded copies are in the same RSS
    estimated["process peak, less data"] = est.device_total - planned["allocator reserve"][0] - context + offloaded
    rows = [{"component": n, "estimated_bytes": int(estimated[n]), "measured_bytes": int(measured[n]),
             "error": (estimated[n] / measured[n] - 1) if measured[n] else None} for n in measured if n in estimated]
    if verdict.get("measured_peak_bytes") is not None:
        verdict["measured_peak_bytes"] = max(verdict["measured_peak_bytes"], peak)
    return {"config": name, "recipe": cfg.get("recipe") or recipe_dict(name, cfg, "runs/check", device_type),
            "overrides": overrides, **verdict, "rows": rows,
            "data_bytes": data_bytes, "plan_seconds": plan_seconds, "tensor_bytes_at_peak": tensors, "cuda_context_measured": meter.context(),
            "images_per_s": {"estimated": est.images_per_s, "measured": n_images / seconds},
            "notes": prof.notes}


# ----------------------------------------------------------------------------- driver
def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def _verdict_line(r: dict) -> str:
    """Recipe configurations on CUDA: the planner's verdict at the budget beside the measured peak."""
    if r.get("budget_bytes") is None:
        return ""
    peak = r.get("measured_peak_bytes")
    inside = peak is not None and peak <= r["budget_bytes"]
    return (f"Budget {_mib(r['budget_bytes'])} MiB (process capped with set_per_process_memory_fraction): planner "
            f"total {_mib(r['estimated_total_bytes'])} MiB, {'fits' if r['planner_fits'] else 'does NOT fit'}; "
            f"measured peak (max_memory_allocated, setup + 3 steps) "
            + ("-" if peak is None else f"{_mib(peak)} MiB ({'inside' if inside else 'OVER'} the budget; "
               f"planner total / measured {r['estimated_total_bytes'] / max(peak, 1):.2f})")
            + (f"; OUT OF MEMORY under the cap: {r['oom'][:200]}" if r.get("oom") else "") + ".")


def write_planner_report(results: List[dict], env: dict, out: Path, skipped: List[str],
                         failed: Optional[List[str]] = None) -> Path:
    from lowres_kd.provenance import write_results

    failed = failed or []
    lines = [f"# Memory planner vs measurement: {env['device_name']} ({env['device']})", "",
             f"torch {env['torch']}, git {env['git_sha']}; error = estimate / measured - 1. "
             "`benchmarks/check_planner.py` explains each row."
             + (f" Skipped: {'; '.join(skipped)}." if skipped else "")
             + (f" FAILED: {'; '.join(failed)}." if failed else ""), ""]
    for r in results:
        lines += [f"## {r['config']}" + (f" ({r['recipe']})" if isinstance(r.get("recipe"), str) else ""), ""]
        if _verdict_line(r):
            lines += [_verdict_line(r), ""]
        if not r["rows"]:
            continue
        ips = r["images_per_s"]
        lines += ["| component | estimated MiB | measured MiB | error |", "|---|---:|---:|---:|"]
        for row in r["rows"]:
            err = "" if row["error"] is None else f"{row['error']:+.1%}"
            lines.append(f"| {row['component']} | {_mib(row['estimated_bytes'])} | {_mib(row['measured_bytes'])} | {err} |")
        process = next(row["measured_bytes"] for row in r["rows"] if row["component"] == "process peak, less data")
        lines += ["", f"Decoded training images (left out of the process row): {_mib(r['data_bytes'])} MiB. "
                  + (f"Of the process row, {_mib(process - r['tensor_bytes_at_peak'])} MiB are not tensors. "
                     if env["device"] == "cpu" else "")
                  + f"Images/s: estimated {ips['estimated']:.1f}, measured {ips['measured']:.1f} "
                  f"({ips['estimated'] / ips['measured'] - 1:+.0%}). Planner time {r['plan_seconds']:.1f} s."
                  + (f" CUDA context measured: {_mib(r['cuda_context_measured'])} MiB." if env["device"] == "cuda" else ""),
                  ""]
        if r["notes"]:
            lines += ["Notes: " + "; ".join(r["notes"]), ""]
    result = {"environment": env, "configs": results, "skipped": skipped, "failed": failed}

    def markdown(path: Path) -> None:
        path.write_text("\n".join(lines))

    stem = write_results(out, "planner", env, result, markdown, lambda path: _plot(path, env, results))
    return stem.with_suffix(".md")


def _plot(path: Path, env: dict, results: List[dict]) -> None:
    """Estimated against measured process peak per configuration (MiB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, est, got = [], [], []
    for r in results:
        row = next((x for x in r["rows"] if x["component"] == "process peak, less data"), None)
        if row is not None:
            names.append(r["config"])
            est.append(row["estimated_bytes"] / 2**20)
            got.append(row["measured_bytes"] / 2**20)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(names) + 2), 3.6))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], est, 0.4, label="planner estimate")
    ax.bar([x + 0.2 for x in xs], got, 0.4, label="measured")
    ax.set_xticks(list(xs), names)
    ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    ax.set_ylabel("process peak, less data (MiB)")
    ax.legend(fontsize=8)
    ax.set_title(f"planner vs measured, {env['device_name']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    ap.add_argument("--configs", default=",".join(c for c in CONFIGS if not c.startswith("recipe-")),
                    help="comma-separated subset of: " + ", ".join(CONFIGS) + ", or file:PATH for any recipe file "
                         "(default: all but the recipe-* ones)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--random-weights", type=Path, default=None, metavar="DIR",
                    help="recipe configurations: hub weights -> random-weight local files in DIR")
    ap.add_argument("--images", type=Path, default=None, metavar="DIR",
                    help="recipe configurations: train on random images written into DIR")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="time budget: no configuration starts once spent; each one's time ends with it")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = {"random_weights": str(args.random_weights) if args.random_weights else None,
               "images": str(args.images) if args.images else None}
    if args.child:
        print(json.dumps(run_config(args.child, args.device, options)))
        return 0

    from lowres_kd.provenance import environment

    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS and not n.startswith("file:")]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    env = environment(torch.device(args.device), REPO)
    child_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    results, skipped, failed = [], [], []
    t0 = time.perf_counter()
    for name in names:
        cfg = config_of(name)
        needs = [m for m in cfg.get("needs", ()) if importlib.util.find_spec(m) is None]
        left = None if args.max_seconds is None else args.max_seconds - (time.perf_counter() - t0)
        if needs:
            skipped.append(f"{name} (needs {', '.join(needs)})")
            continue
        if cfg.get("device") == "cuda" and args.device != "cuda":
            skipped.append(f"{name} (needs CUDA: its budget is a GPU's)")
            continue
        if left is not None and left <= 5:
            skipped.append(f"{name} (--max-seconds spent)")
            continue
        started = time.perf_counter()
        cmd = [sys.executable, __file__, "--device", args.device, "--child", name]
        cmd += [f"--random-weights={args.random_weights}"] if args.random_weights else []
        cmd += [f"--images={args.images}"] if args.images else []
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, cwd=REPO, timeout=left)
        except subprocess.TimeoutExpired:
            failed.append(f"{name} (timeout after {left:.0f} s)")
            print(f"{name}: timeout after {left:.0f} s", flush=True)
            continue
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            failed.append(f"{name} (exit {proc.returncode}: {last})")
            print(f"{name}: FAILED (exit {proc.returncode})", flush=True)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        worst = max((abs(r["error"]) for r in result["rows"] if r["error"] is not None), default=0)
        print(f"{name}: {time.perf_counter() - started:.0f} s, worst component error {worst:.1%}"
              + (f"; {_verdict_line(result)}" if _verdict_line(result) else ""), flush=True)
    path = write_planner_report(results, env, args.out, skipped, failed)
    print(path.read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
