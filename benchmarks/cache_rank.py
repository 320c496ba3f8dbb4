"""How small can the teacher cache be: rank vs cosine vs bytes, per teacher, on a recipe's teachers.

For each cached teacher of RECIPE and kind (global, dense) it fits the PCA basis as ``lowres-kd
cache`` does (the normalised targets of the first ``--fit-images`` training views: epoch 0's,
then epoch 1's, ...), then stores the targets of *other* views (crops the fit never saw) at each
rank and storage dtype, reads them back as training does, and reports:

  bytes/img     stored bytes per image and view, global + dense (int8: one fp32 scale a row)
  cosine        mean cosine of the read-back targets to the exact ones (dense: per token)

``full`` is the cache without ``cache.rank`` (every channel). Kinds no wider than a rank, or whose
fit saw no more rows than the rank, are stored whole, as the cache does. Writes
cache_rank_<device>.json / .md / .png under --out.

    python benchmarks/cache_rank.py recipes/demo_cpu.yaml --out benchmarks/results/cache_rank_demo_cpu
    python benchmarks/cache_rank.py recipes/demo_vit_cpu.yaml --ranks 16,64,256 --out ...
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from lowres_kd.cache import decode, encode, prepare_targets  # noqa: E402
from lowres_kd.cache.rank import KINDS, fit_moments, project, reconstruct, reduced, rows_of, training_views  # noqa: E402
from lowres_kd.config import load_recipe  # noqa: E402
from lowres_kd.device import resolve_device  # noqa: E402
from lowres_kd.provenance import environment, write_results  # noqa: E402

DTYPES = ("fp16", "int8")
HELD_OUT_EPOCH = 1000  # scored views: an epoch no fit reaches


def measure(recipe, ranks: List[int], dtypes: List[str], fit_images: int, test_images: int) -> List[dict]:
    data, model, targets = prepare_targets(recipe, progress=False)
    names = list(model.specs)
    bs = recipe.train.batch_size

    def normalised(images):
        with torch.no_grad():
            return targets.normalised(images.to(targets.device))

    # the fit draws views as the cache build does (epoch 0, then 1, ...); the score, views of an
    # epoch far past them (crops the fit never saw)
    moments = fit_moments(normalised, training_views(data.augmented, fit_images, bs, epochs=HELD_OUT_EPOCH), names,
                          progress=True)
    exact: Dict[str, Dict[str, List[torch.Tensor]]] = {n: {k: [] for k in KINDS} for n in names}
    images_seen = 0
    for images in training_views(data.augmented, test_images, bs, epochs=1, first_epoch=HELD_OUT_EPOCH):
        images_seen += len(images)
        for name, f in normalised(images).items():
            for kind, x in zip(KINDS, (f.global_, f.dense)):
                exact[name][kind].append(rows_of(kind, x).cpu())
    rows_out = []
    for name in names:
        for rank in [None, *ranks]:
            for dtype in dtypes:
                row = {"teacher": name, "rank": rank or "full", "dtype": dtype, "bytes_per_image": 0.0}
                for kind in KINDS:
                    x = torch.cat(exact[name][kind])
                    width = x.shape[1]
                    if reduced(rank, width, moments[f"{kind}.{name}"].n):  # the basis: per cache, not counted
                        mean, basis = moments[f"{kind}.{name}"].basis(rank)
                        parts = encode(project(x, mean, basis), dtype)
                        back = reconstruct(decode(parts), mean, basis)
                    else:
                        parts = encode(x, dtype)
                        back = decode(parts)
                    stored = sum(p.numel() * p.element_size() for p in parts.values())
                    row[f"{kind}_cosine"] = float(torch.nn.functional.cosine_similarity(back, x, dim=-1).mean())
                    row[f"{kind}_width"] = width
                    row["bytes_per_image"] += stored / images_seen
                row["fp32_bytes_per_image"] = sum(torch.cat(exact[name][k]).numel() * 4 for k in KINDS) / images_seen
                rows_out.append(row)
    return rows_out


def write_markdown(path: Path, env: dict, rows: List[dict], note: str) -> None:
    lines = [f"# Cache size against fidelity ({env['device_name']})", "", note, "",
             "| teacher | rank | dtype | bytes/img | of fp32 | global cosine | dense cosine |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['teacher']} | {r['rank']} | {r['dtype']} | {r['bytes_per_image']:,.0f} | "
                     f"{r['bytes_per_image'] / r['fp32_bytes_per_image']:.3f} | {r['global_cosine']:.4f} | "
                     f"{r['dense_cosine']:.4f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: List[dict], title: str) -> None:
    import matplotlib  # plotting only: the measurement needs no matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for t in teachers:
            for dtype, style in (("int8", "-o"), ("fp16", "--s")):
                pts = [r for r in rows if r["teacher"] == t and r["dtype"] == dtype]
                if not pts:
                    continue
                line, = ax.plot([r["bytes_per_image"] for r in pts], [r[f"{kind}_cosine"] for r in pts], style,
                                label=f"{t} {dtype}", ms=4)
                for r in pts:
                    ax.annotate(str(r["rank"]), (r["bytes_per_image"], r[f"{kind}_cosine"]), fontsize=6,
                                xytext=(2, 2), textcoords="offset points", color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("stored bytes per image and view (global + dense)")
        ax.set_title(f"{kind} targets")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cosine to the exact targets (labels: rank)")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--out", type=Path, required=True, help="folder for cache_rank_<device>.json / .md / .png")
    ap.add_argument("--ranks", default="8,16,32,64,128,256", help="comma-separated ranks (default: %(default)s)")
    ap.add_argument("--dtypes", default="int8,fp16", help="storage dtypes (default: %(default)s)")
    ap.add_argument("--fit-images", type=int, default=256, help="training views the basis is fitted on, as "
                    "cache.rank_images (default: %(default)s)")
    ap.add_argument("--test-images", type=int, default=128, help="held-out views scored (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    args = ap.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        ap.error(f"--dtypes: {', '.join(unknown)} unknown; choose from {', '.join(DTYPES)}")
    recipe = load_recipe(args.recipe, [*args.set, "teachers_from=live"])
    env = environment(resolve_device(recipe.train.device), REPO)
    start = time.perf_counter()
    rows = measure(recipe, ranks, dtypes, args.fit_images, args.test_images)
    seconds = time.perf_counter() - start
    note = (f"Recipe {args.recipe} ({recipe.name}); basis fitted on {args.fit_images} training views, scored on "
            f"{args.test_images} held-out views at most; torch {env['torch']}, git {env['git_sha']}, "
            f"{seconds:.0f} s.")
    result = {"recipe": str(args.recipe), "env": env, "rows": rows, "seconds": seconds, "note": note}
    write_results(args.out, "cache_rank", env, result, lambda p: write_markdown(p, env, rows, note),
                  lambda p: plot(p, rows, note))
    return result


if __name__ == "__main__":
    main()
