"""What each ``lowres-kd`` command does once its arguments are parsed (``cli`` parses them)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

import torch
import yaml

from .config import RecipeError, load_recipe
from .evaluation import compare_runs, run_probes
from .export import export_backbone
from .launch import cache_for, trainer_for
from .losses import DISTANCES
from .lowmem import FidelityError
from .normalizers import NORMALIZERS
from .planner import plan_recipe
from .probes import PROBES
from .rundir.lock import RunDirectoryInUse
from .device import memory_budget
from .errors import UserError
from .teachers import TEACHERS
from .training.trainer import NonFiniteLossError, TrainingOutOfMemory
from .units import parse_bytes

# Every user error is a UserError (lowres_kd.errors); these built-ins also name a path the user gave
# (a missing file, a run folder that already holds checkpoints) or a feature asked for that is not built
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotImplementedError)
RUN_STOPPED = (NonFiniteLossError, TrainingOutOfMemory, RunDirectoryInUse, FidelityError)


def run(args) -> int:
    """Exit code 0 on success, 1 when nothing came out (no probe row, no plan that fits), 2 for a
    user error, 3 when a run stopped (non-finite losses, out of memory, a busy run directory).
    A user error is one line, ``lowres-kd: error: ...``; ``--debug`` shows its traceback too."""
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        if getattr(args, "debug", False):
            raise
        print(f"lowres-kd: error: {exc}", file=sys.stderr)
        return 2
    except RUN_STOPPED as exc:
        if getattr(args, "debug", False):
            raise
        print(f"lowres-kd: stopped: {exc}", file=sys.stderr)
        return 3


def _train(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    trainer = trainer_for(recipe, resume=args.resume, progress=not args.no_progress).setup()
    last = trainer.train()
    print(f"trained {recipe.name}: {trainer.step} steps, final loss {last.get('loss', float('nan')):.4f}; "
          f"model in {recipe.run_dir / 'model'}")
    if args.probe:
        run_probes(recipe.run_dir, device=recipe.train.device, progress=not args.no_progress)
        print((recipe.run_dir / "report.md").read_text())
    return 0


def _sizes(text: str) -> List[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--sizes: {text!r} is not allowed; comma-separated pixels, e.g. 112,160,224") from None


def _probe(args) -> int:
    probes = args.probes.split(",") if args.probes else None
    data = args.data.split(",") if args.data else None
    result = run_probes(args.run, probes, device=args.device, progress=not args.no_progress, data=data,
                        images=args.images, sizes=_sizes(args.sizes) if args.sizes else None, overrides=args.overrides)
    print((Path(args.run) / "report.md").read_text())
    return 0 if result["rows"] else 1


def _compare(args) -> int:
    labels = args.labels.split(",") if args.labels else None
    print(compare_runs(args.runs, args.out, labels).read_text())
    return 0


def _cache(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    report = cache_for(recipe, progress=not args.no_progress)
    print(f"cache {recipe.cache_dir}: {report['images']} images x {report['views']} views, "
          f"{report['bytes'] / 2**20:.1f} MiB ({report['ratio']:.3f} of fp32), storage error "
          f"{report['relative_error']:.2e} relative, {report['max_abs_error']:.2e} max")
    return 0


def _export(args) -> int:
    print(f"wrote {export_backbone(args.run, args.out, force=args.force)}")
    return 0


def _validate(args) -> int:
    print(yaml.safe_dump(load_recipe(args.recipe, args.overrides).to_dict(), sort_keys=False))
    return 0


def _plan(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.gpu_mem:
        try:
            budget = parse_bytes(args.gpu_mem)
        except (ValueError, OverflowError) as exc:
            raise RecipeError(f"--gpu-mem: {exc}") from None
    elif args.device == "cuda" and not recipe.plan.gpu_mem and not torch.cuda.is_available():
        raise RecipeError("no GPU here to read its memory from: give --gpu-mem (e.g. --gpu-mem 12GiB) or set plan.gpu_mem")
    else:  # plan.gpu_mem, else the device's memory, as training with memory: auto reads it
        budget = memory_budget(recipe, torch.device(args.device))
    if args.world_size < 1:
        raise RecipeError(f"--world-size: expected an integer >= 1, got {args.world_size}")
    if args.gpu_tflops is not None and not 0 < args.gpu_tflops < 1e9:
        raise RecipeError(f"--gpu-tflops: expected a number in (0, 1e9), got {args.gpu_tflops}")
    if not 0 < budget <= 2**60:
        raise RecipeError(f"--gpu-mem: {args.gpu_mem} is not allowed; between 1 byte and 2**60 bytes (1 EiB)")
    if args.world_size > 65536:
        raise RecipeError(f"--world-size: at most 65536, got {args.world_size}")
    plan = plan_recipe(recipe, budget, world_size=args.world_size, device_type=args.device, tflops=args.gpu_tflops)
    print(json.dumps(plan.as_dict(), indent=1) if args.json else plan.table())
    if not plan.fits:
        print(f"lowres-kd: {plan.error}", file=sys.stderr)
    return 0 if plan.fits else 1


def _list(args) -> int:
    for reg in (TEACHERS, NORMALIZERS, DISTANCES, PROBES):
        print(f"{reg.kind}s: {', '.join(reg.list(args.pattern))}")
    return 0


COMMANDS = {"train": _train, "probe": _probe, "compare": _compare, "cache": _cache, "export": _export,
            "validate": _validate, "plan": _plan, "list": _list}
