"""``lowres-kd``: train, probe, validate recipes and list what is registered."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

DESCRIPTION = """\
Knowledge inheritance: train one student from several frozen vision teachers in a balanced
shared space, starting from the general-purpose (base) teacher through an adapter.

  lowres-kd train recipes/demo_cpu.yaml          # the CPU demo (~14 minutes of training on 2 cores)
  lowres-kd probe runs/demo                      # probes + report.md for a finished run
"""


def _add_debug(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the traceback of an error too (a user error is otherwise one line)")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe (see recipes/; every key is documented in lowres_kd/config.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, value parsed as YAML; repeatable. "
                        "Examples: --set train.steps=20 --set teachers.1.weight=0.5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowres-kd", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_debug(parser, default=False)
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
                       description="kNN and linear classification, linear segmentation (mIoU), dense edge probe "
                                   "(HED edge maps) and per-teacher fidelity; compares the student with every "
                                   "teacher, the untrained student and a scratch baseline. Each subject's features "
                                   "on a set are computed once. Writes probes.json, report.md and PNG plots.")
    p.add_argument("run", help="run directory (runs/<name>) or checkpoint directory")
    p.add_argument("--probes", default=None, help="comma-separated probes to run (default: the recipe's probe.probes)")
    p.add_argument("--data", default=None, metavar="SET[,SET...]",
                   help="labelled sets, replacing the recipe's probe.data: fashion_mnist, digits, pasted (built-in "
                        "segmentation) or a folder: FOLDER/{train,val}/<class>/ or FOLDER/<class>/ for classes, "
                        "FOLDER/{images,masks}/ + classes.txt for segmentation (docs/evaluation.md)")
    p.add_argument("--images", default=None, metavar="FOLDER",
                   help="images for the edge and fidelity probes, replacing probe.images: a folder the student "
                        "never trained on, or 'embedded'")
    p.add_argument("--sizes", default=None, metavar="PX[,PX...]",
                   help="score every probe at each input size (e.g. 112,160,224): the student, student@init and "
                        "scratch run at that size; writes resolution.png (score against size)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="probe.KEY=VALUE",
                   help="change a probe setting of the run's recipe for this scoring, e.g. "
                        "--set probe.train_per_class=100 (repeatable; only probe.* keys)")
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
    p.add_argument("out", help="output .safetensors file (not inside the run's model/, checkpoints/ or cache/)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("compare", help="put scored runs side by side: one Markdown report with a PNG",
                       description="Reads each run's probes.json (lowres-kd probe RUN first) and writes "
                                   "compare.md, compare.png and compare.json: what each run was (mode, steps, "
                                   "seed, data), one table per probe metric with a column per run, and every "
                                   "run's student, student@init and scratch against its base teacher's score. "
                                   "For ablations: train the same recipe with --set student.mode=adapter|full|"
                                   "scratch, probe each, compare them.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, each scored by lowres-kd probe")
    p.add_argument("--out", required=True, help="folder for compare.md / compare.png / compare.json")
    p.add_argument("--labels", default=None, help="comma-separated column names, one per run (default: folder names)")

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
    for p in sub.choices.values():
        _add_debug(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """The ``lowres-kd`` command; ``argv`` given (a test, a script): runs in this process as it is."""
    args = build_parser().parse_args(argv)
    if argv is None:  # the command line: re-run once with the allocator keeping freed memory
        from .malloc import reexec_keeping_freed_memory

        reexec_keeping_freed_memory()
    from . import commands  # after parsing: --help and usage errors load no torch (start-up time)

    return commands.run(args)


if __name__ == "__main__":
    sys.exit(main())
