"""Benchmark the adapter-mode base at 16, 8 and 4 bits (QLoRA-style preservation), in one run.

For each bit width of the recipe's base teacher (the student's own frozen backbone under LoRA):

  base MiB        every tensor of the base as held (bitsandbytes' quantization state included),
                  and its ratio to the fp32 base
  cosine          the base's global and dense features (adapter disabled) against the fp32 base's
                  on the recipe's first --images centre-cropped training images (raw feature space)
  student step    the student's own forward + backward on one batch (LoRA on the base, no teachers,
                  no heads): its peak tensor bytes (the student's tensors + what the step allocates,
                  counted by ``planner.memtrack.LiveBytes``, the same on CPU and GPU) and images/s
  images/s        the recipe's whole training step (teachers, heads, loss), median after the first --warmup steps
                  (``benchmarks/bench_train.py``'s worker: the real trainer in a fresh subprocess)
  peak memory     GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS, Python,
                  teachers and libraries included (only differences between rows mean anything)

Ratios are against the 16-bit base (``vs 16-bit``), the baseline a careful user keeps.

Writes qlora[_<tag>]_<device>.json / .md / .png under --out.

    python benchmarks/bench_qlora.py                                    # the ViT demo's DINOv2 ViT-S/14
    python benchmarks/bench_qlora.py --steps 6 --images 16 --tag vits
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, Path(__file__).resolve().parent):  # runnable as a script from a checkout
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_train  # noqa: E402  (its worker trains one configuration in a subprocess)
from lowres_kd.build import build_student, student_backbone_config, training_images  # noqa: E402
from lowres_kd.config import load_recipe  # noqa: E402
from lowres_kd.data import collate_images  # noqa: E402
from lowres_kd.lowmem import move_to, teacher_fidelity, tensor_bytes  # noqa: E402
from lowres_kd.planner.memtrack import LiveBytes  # noqa: E402
from lowres_kd.provenance import environment, write_results  # noqa: E402
from lowres_kd.teachers import build_teacher  # noqa: E402

RECIPE = REPO / "recipes" / "demo_vit_cpu.yaml"
BITS = (16, 8, 4)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=RECIPE, help="an adapter-mode recipe (default: the ViT demo)")
    p.add_argument("--steps", type=int, default=6, help="training steps per bit width")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of images/s")
    p.add_argument("--images", type=int, default=16, help="images for the feature cosine")
    p.add_argument("--repeats", type=int, default=3, help="timed student steps per bit width")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override for every row")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--timeout", type=int, default=900, help="seconds per training row")
    p.add_argument("--tag", default=None, help="output name part: qlora_<tag>_<device>.*")
    return p


def base_index(recipe) -> int:
    if recipe.student.mode != "adapter":
        raise SystemExit(f"{recipe.name}: student.mode is {recipe.student.mode!r}; this benchmark needs an "
                         "adapter-mode recipe (the base is the student's own frozen backbone)")
    return next(i for i, t in enumerate(recipe.teachers) if t.base)


def student_step(student, images: torch.Tensor, repeats: int):
    """(peak bytes the student's forward + backward allocate, median seconds of one): the
    adapter's step on the base alone, without teachers, heads or data loading."""
    student.train()

    def step():
        feats = student(images)
        (feats.global_.square().mean() + feats.dense.square().mean()).backward()
        student.zero_grad(set_to_none=True)

    with LiveBytes() as live:  # every tensor the step creates, gradients included
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if images.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return live.peak, statistics.median(times)


def feature_rows(recipe_path: Path, overrides: List[str], n_images: int, device: torch.device,
                 repeats: int) -> List[Dict]:
    """Bytes and feature cosine of the base at each bit width, against the fp32 base, and the
    student's own step on it."""
    recipe = load_recipe(recipe_path, overrides)
    i = base_index(recipe)
    calibration = training_images(recipe).calibration
    images = collate_images([calibration[k] for k in range(min(n_images, len(calibration)))])[0].to(device)
    reference = move_to(build_teacher(student_backbone_config(recipe)).freeze(), device)
    fp32_bytes = tensor_bytes(reference)
    with torch.no_grad():
        want = reference(images)
    del reference
    rows = []
    for bits in BITS:
        student = move_to(build_student(load_recipe(recipe_path, [*overrides, f"teachers.{i}.bits={bits}"])), device)
        base_bytes = tensor_bytes(student.body) - sum(p.numel() * p.element_size() for p in student.parameters()
                                                      if p.requires_grad)  # the LoRA adapter apart
        got = student.base_features(images)
        fid = teacher_fidelity(want, got)
        peak, seconds = student_step(student, images[:recipe.train.batch_size], repeats)
        rows.append({"bits": bits, "base_mib": base_bytes / 2**20, "base_vs_fp32": base_bytes / fp32_bytes,
                     "cos_global": fid.cos_global, "cos_dense": fid.cos_dense, "images": fid.images,
                     "student_step_peak_mib": (tensor_bytes(student) + peak) / 2**20,
                     "student_images_per_s": len(images[:recipe.train.batch_size]) / seconds})
        del student
    return rows


def train_rows(recipe_path: Path, overrides: List[str], args) -> List[Dict]:
    i = base_index(load_recipe(recipe_path, overrides))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in BITS:
            spec = {"name": f"base {bits}-bit", "budget": None, "recipe": str(recipe_path), "warmup": args.warmup,
                    "overrides": [*overrides, f"teachers.{i}.bits={bits}", f"train.steps={args.steps}",
                                  f"train.checkpoint_every={args.steps + 1}", f"output_dir={tmp}/{bits}"]}
            record = bench_train.run_config(spec, args.timeout)
            print(f"{spec['name']}: " + (f"{record['images_per_s']:.2f} images/s, {record['peak_mem_gib']:.2f} GiB"
                                         if record["fits"] else f"no result ({record.get('error')})"), flush=True)
            rows.append({"bits": bits, **{k: record.get(k) for k in ("fits", "error", "images_per_s", "peak_mem_gib")}})
    return rows


def merge(features: List[Dict], training: List[Dict]) -> List[Dict]:
    rows = [{**f, **t} for f, t in zip(features, training)]
    ref = next((r for r in rows if r["bits"] == 16 and r.get("fits")), None)
    for r in rows:
        r["step_peak_vs_16"] = r["student_step_peak_mib"] / rows[0]["student_step_peak_mib"]
        r["student_speed_vs_16"] = r["student_images_per_s"] / rows[0]["student_images_per_s"]
        if ref and r.get("fits"):
            r["speed_vs_16"] = r["images_per_s"] / ref["images_per_s"]
            r["peak_mem_vs_16"] = r["peak_mem_gib"] / ref["peak_mem_gib"]
    return rows


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def write_markdown(path: Path, env: Dict, rows: List[Dict], note: str) -> None:
    lines = [f"# Adapter-mode base at 16 / 8 / 4 bits ({env['device_name']})", "",
             f"torch {env['torch']}, bitsandbytes {env['bitsandbytes']}, peft {env['peft']}, git {env['git_sha']}", "",
             note, "",
             "| base | MiB | vs fp32 | cos global | cos dense | student step peak MiB | vs 16-bit | "
             "student step images/s | vs 16-bit | training images/s | vs 16-bit | process peak GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['bits']}-bit | {r['base_mib']:.2f} | {r['base_vs_fp32']:.3f} | {r['cos_global']:.4f} | "
                     f"{r['cos_dense']:.4f} | {r['student_step_peak_mib']:.0f} | {_fmt(r.get('step_peak_vs_16'), '.2f')} | "
                     f"{r['student_images_per_s']:.2f} | {_fmt(r.get('student_speed_vs_16'), '.2f')} | "
                     f"{_fmt(r.get('images_per_s'), '.2f')} | {_fmt(r.get('speed_vs_16'), '.2f')} | "
                     f"{_fmt(r.get('peak_mem_gib'), '.2f')} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, env: Dict, rows: List[Dict], note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['bits']}-bit" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    axes[0].bar(labels, [r["base_mib"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("base MiB")
    axes[1].plot(labels, [r["cos_global"] for r in rows], "o-", label="global")
    axes[1].plot(labels, [r["cos_dense"] for r in rows], "s-", label="dense")
    axes[1].set_ylabel("cosine to the fp32 base")
    axes[1].legend()
    axes[2].bar(labels, [r["student_step_peak_mib"] for r in rows], color="tab:green")
    axes[2].set_ylabel("student step peak MiB")
    fig.suptitle(f"adapter-mode base, {env['device_name']} ({note[:110]})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = _parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device, REPO, modules=("bitsandbytes", "peft", "timm"))
    t0 = time.perf_counter()
    features = feature_rows(args.recipe, args.overrides, args.images, device, args.repeats)
    rows = merge(features, train_rows(args.recipe, args.overrides, args))
    note = (f"{args.recipe.name}, cosine on {features[0]['images']} images (raw features, adapter disabled, vs the "
            f"fp32 base), {args.steps} training steps a row, images/s = median after {args.warmup} warm-up step(s)"
            + ("" if device.type == "cuda" else "; CPU: peak memory is the whole process's RSS"))
    name = f"qlora_{args.tag}" if args.tag else "qlora"
    result = {"env": env, "note": note, "recipe": str(args.recipe), "rows": rows,
              "seconds": time.perf_counter() - t0}
    stem = write_results(args.out, name, env, result, lambda p: write_markdown(p, env, rows, note),
                         lambda p: write_plot(p, env, rows, note))
    return {"env": env, "rows": rows, "files": [str(stem.with_suffix(s)) for s in (".json", ".md", ".png")]}


if __name__ == "__main__":
    main()
