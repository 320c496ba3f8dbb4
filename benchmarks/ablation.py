"""The trained ablation: one recipe, trained alike in each student mode, probed, compared.

Knowledge preservation says the adapter keeps the base's features and scratch does not; transfer
says each trained mode gains on what the other teachers know (the edge probe) over the base's
own features. This script trains the recipe once per mode with the same steps, data and seed
(only ``student.mode`` differs), runs the recipe's probes on each run, and writes
``lowres-kd compare``'s report of the runs, with the device, versions and git sha, under --out.

    python benchmarks/ablation.py recipes/demo_cpu.yaml --out benchmarks/results/ablation_demo_cpu
    python benchmarks/ablation.py recipes/demo_cpu.yaml --modes adapter,scratch --set train.steps=20
    python benchmarks/ablation.py recipes/demo_cpu.yaml --seeds 0,1 --reuse --out ...   # spread over seeds
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowres_kd.config import load_recipe
from lowres_kd.evaluation import compare_runs, run_probes
from lowres_kd.launch import trainer_for
from lowres_kd.provenance import environment

REPO = Path(__file__).resolve().parents[1]


def _timings(out: Path) -> dict:
    try:
        return json.loads((out / "timings.json").read_text())["seconds"]
    except (OSError, ValueError, KeyError):
        return {}


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--out", required=True, help="folder for compare.md / .png / .json and timings.json")
    ap.add_argument("--runs", default="runs/ablation",
                    help="where the trained runs go (<runs>/<recipe name>/<mode>, or <mode>-seed<k> with --seeds)")
    ap.add_argument("--modes", default="adapter,full,scratch", help="comma-separated student modes")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated train.seed values, each mode trained once per seed (default: the recipe's); "
                         "the comparison reports each mode's spread over them")
    ap.add_argument("--reuse", action="store_true",
                    help="keep a run that already has probes.json and timings in --out; train and probe the rest")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override applied to every run (e.g. train.steps=20)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    out = Path(args.out)
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"), REPO)  # the code that runs
    previous = _timings(out) if args.reuse else {}
    runs, labels, timings = [], [], {}
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # every mode of one seed before the next seed
        for mode in modes:
            label = mode if seed is None else f"{mode}-seed{seed}"
            extra = [f"student.mode={mode}", f"output_dir={Path(args.runs) / '{name}' / label}"]
            recipe = load_recipe(args.recipe, args.overrides + extra + ([f"train.seed={seed}"] if seed is not None else []))
            if label in previous and (recipe.run_dir / "probes.json").is_file():
                timings[label] = previous[label]
            else:
                started = time.perf_counter()
                trainer_for(recipe, progress=not args.no_progress).setup().train()
                trained = time.perf_counter()
                run_probes(recipe.run_dir, device=recipe.train.device, progress=not args.no_progress)
                timings[label] = {"train_s": round(trained - started, 1), "probe_s": round(time.perf_counter() - trained, 1),
                                  "git_sha": env["git_sha"]}
            runs.append(recipe.run_dir)
            labels.append(label)
            (out / "timings.json").write_text(json.dumps({"recipe": args.recipe, "overrides": args.overrides,
                                                          "env": env, "seconds": timings}, indent=1))
    report = compare_runs(runs, out, labels=labels)
    seconds = ", ".join(f"{m} {t['train_s']:.0f} s training + {t['probe_s']:.0f} s probes" for m, t in timings.items())
    shas = sorted({t.get("git_sha", env["git_sha"]) for t in timings.values()})
    with report.open("a") as f:
        f.write(f"\nMeasured with `python benchmarks/ablation.py {args.recipe}"
                + "".join(f" --set {o}" for o in args.overrides) + (f" --seeds {args.seeds}" if args.seeds else "")
                + f"` on {env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
                f"git {', '.join(shas)}: {seconds}.\n")
    print(report.read_text())
    return report


if __name__ == "__main__":
    main()
