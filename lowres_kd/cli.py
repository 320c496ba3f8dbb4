"""``lowres-kd``: train, probe, validate recipes and list what is registered."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

DESCRIPTION = """\
Knowledge inheritance: train one student from several frozen vision teachers in a balanced
shared space, starting from the general-purpose (base) teacher through an adapter.

  lowres-kd train recipes/demo_cpu.yaml          # the CPU demo (about 10 minutes on 2 cores)
  lowres-kd probe runs/demo                      # probes + report.md for a finished run
"""


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe (see recipes/; every key is documented in lowres_kd/config.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, value parsed as YAML; repeatable. "
                        "Examples: --set train.steps=20 --set teachers.1.weight=0.5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowres-kd", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a student from a recipe",
                       description="Calibrate the normalisers, train, checkpoint (safetensors) and export "
                                   "the run to <output_dir>/model; logs every loss term to log.csv.")
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in the run directory (exact on CPU)")
    p.add_argument("--probe", action="store_true", help="run the recipe's probes and write report.md after training")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    p = sub.add_parser("probe", help="score a finished run with frozen-feature probes and write report.md",
                       description="Linear classification (labelled set), dense edge probe (HED edge maps) and "
                                   "per-teacher fidelity; compares the student with every teacher, the untrained "
                                   "student and a scratch baseline. Writes probes.json, report.md and PNG plots.")
    p.add_argument("run", help="run directory (runs/<name>) or checkpoint directory")
    p.add_argument("--probes", default=None, help="comma-separated probes to run (default: the recipe's probe.probes)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run the probes")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    p = sub.add_parser("cache", help="run every teacher once and store normalised targets (train with no teacher loaded)",
                       description="Fit the normalisers, then store each teacher's normalised global and dense "
                                   "targets for cache.epochs augmented views of every image in cache.dir "
                                   "(fp16, or int8 with per-row scales). Train from it with "
                                   "--set teachers_from=cache; a cache that no longer matches the recipe is refused.")
    _add_recipe_args(p)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    p = sub.add_parser("export", help="write the trained backbone alone, LoRA merged, as safetensors",
                       description="The student's network with the adapter merged into its weights, under the "
                                   "family's own keys (timm / torchvision): usable without lowres-kd, or as a "
                                   "teacher's weights in a later recipe.")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("out", help="output .safetensors file")

    p = sub.add_parser("validate", help="check a recipe and print it with every default filled in")
    _add_recipe_args(p)

    p = sub.add_parser("plan", help="estimate GPU memory per component and pick settings that fit",
                       description="Measures the recipe's models on the meta device (no weights loaded, no GPU "
                                   "needed), prints the memory of each component on one GPU (teachers, student "
                                   "state under the engine, activations, heads, loss buffers, reserve) and the "
                                   "changes that make it fit: micro-batch + accumulation, checkpointing, teacher "
                                   "bits and offload, ZeRO stage and offload, 8-bit AdamW. Exit code 1 when "
                                   "nothing fits.")
    _add_recipe_args(p)
    p.add_argument("--gpu-mem", default=None, metavar="SIZE",
                   help="memory of one GPU, e.g. 12GiB or 8GB (default: the recipe's plan.gpu_mem, else this "
                        "machine's GPU; with --device cpu its RAM)")
    p.add_argument("--world-size", type=int, default=1, metavar="N", help="GPUs the run is spread over (ZeRO partitions)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="the device type to plan for")
    p.add_argument("--gpu-tflops", type=float, default=None, metavar="T",
                   help="peak dense TFLOPS assumed for the images/s estimate (cuda default 100, cpu 0.2)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the Markdown table")

    p = sub.add_parser("list", help="list registered teachers, normalisers, distances and probes")
    p.add_argument("--pattern", default="*", help="glob to filter names")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .cache import StaleCacheError
    from .training.trainer import ResumeMismatch
    from .config import RecipeError, load_recipe

    try:
        if args.command == "train":
            return _train(args, load_recipe(args.recipe, args.overrides))
        if args.command == "probe":
            from .probes import run_probes

            probes = args.probes.split(",") if args.probes else None
            result = run_probes(args.run, probes, device=args.device, progress=not args.no_progress)
            print((Path(args.run) / "report.md").read_text())
            return 0 if result["rows"] else 1
        if args.command == "cache":
            from .cache import build_cache

            recipe = load_recipe(args.recipe, args.overrides)
            report = build_cache(recipe, progress=not args.no_progress)
            print(f"cache {recipe.cache_dir}: {report['images']} images x {report['views']} views, "
                  f"{report['bytes'] / 2**20:.1f} MiB ({report['ratio']:.3f} of fp32), storage error "
                  f"{report['relative_error']:.2e} relative, {report['max_abs_error']:.2e} max")
            return 0
        if args.command == "export":
            from .export import export_backbone

            print(f"wrote {export_backbone(args.run, args.out)}")
            return 0
        if args.command == "validate":
            import yaml

            print(yaml.safe_dump(load_recipe(args.recipe, args.overrides).to_dict(), sort_keys=False))
            return 0
        if args.command == "list":
            return _list(args.pattern)
        if args.command == "plan":
            return _plan(args, load_recipe(args.recipe, args.overrides))
    except (RecipeError, FileNotFoundError, FileExistsError, StaleCacheError, ResumeMismatch, NotImplementedError) as exc:
        print(f"lowres-kd: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the run stopped: non-finite losses, out of memory, a busy run directory
        from .lowmem import FidelityError
        from .training.lock import RunDirectoryInUse
        from .training.trainer import NonFiniteLossError, TrainingOutOfMemory

        if not isinstance(exc, (NonFiniteLossError, TrainingOutOfMemory, RunDirectoryInUse, FidelityError)):
            raise
        print(f"lowres-kd: stopped: {exc}", file=sys.stderr)
        return 3
    return 1


def _train(args, recipe) -> int:
    from .training.trainer import Trainer

    trainer = Trainer(recipe, resume=args.resume, progress=not args.no_progress).setup()
    last = trainer.train()
    print(f"trained {recipe.name}: {trainer.step} steps, final loss {last.get('loss', float('nan')):.4f}; "
          f"model in {recipe.run_dir / 'model'}")
    if args.probe:
        from .probes import run_probes

        run_probes(recipe.run_dir, device=recipe.train.device, progress=not args.no_progress)
        print((recipe.run_dir / "report.md").read_text())
    return 0


def _plan(args, recipe) -> int:
    import json

    import torch

    from .config import RecipeError
    from .planner import PlanError, plan_recipe
    from .training.trainer import memory_budget
    from .units import parse_bytes

    if args.gpu_mem:
        try:
            budget = parse_bytes(args.gpu_mem)
        except ValueError as exc:
            raise RecipeError(f"--gpu-mem: {exc}") from None
    elif args.device == "cuda" and not recipe.plan.gpu_mem and not torch.cuda.is_available():
        raise RecipeError("no GPU here to read its memory from: give --gpu-mem (e.g. --gpu-mem 12GiB) or set plan.gpu_mem")
    else:  # plan.gpu_mem, else the device's memory, as training with memory: auto reads it
        budget = memory_budget(recipe, torch.device(args.device))
    if args.world_size < 1:
        raise RecipeError(f"--world-size: expected an integer >= 1, got {args.world_size}")
    try:
        plan = plan_recipe(recipe, budget, world_size=args.world_size, device_type=args.device, tflops=args.gpu_tflops)
    except PlanError as exc:
        print(f"lowres-kd: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict(), indent=1) if args.json else plan.table())
    if not plan.fits:
        print(f"lowres-kd: {plan.error}", file=sys.stderr)
    return 0 if plan.fits else 1


def _list(pattern: str) -> int:
    from .losses import DISTANCES
    from .normalizers import NORMALIZERS
    from .probes import PROBES
    from .teachers import TEACHERS

    for reg in (TEACHERS, NORMALIZERS, DISTANCES, PROBES):
        print(f"{reg.kind}s: {', '.join(reg.list(pattern))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
