"""``lowres-kd compare RUN [RUN ...]``: every run's probe scores side by side, one report.

The evidence for an ablation (adapter vs full vs scratch trained alike): a table of what each
run was (mode, steps, seed, data), one table per metric with a column per run, and a plot of
each run's subjects against its base teacher's score.

Runs whose recipes differ only in ``train.seed`` (and where they were written) are replicates:
their spread over seeds gets a table of its own (mean ± sample standard deviation of each score
and of its difference to the base), and the plot draws each group's mean difference with that
spread as an error bar.
"""
from __future__ import annotations

import copy
import json
import os
import re
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from .report import headline_metrics, metric_label, plot_differences, score_cell, scores

# subjects drawn in the comparison plot (all appear in the tables)
PLOTTED = ("student", "student@init", "scratch")


def read_result(run_dir: Path) -> dict:
    path = Path(run_dir) / "probes.json"
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir}: no probes.json; score the run first: lowres-kd probe {run_dir}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); rerun lowres-kd probe {run_dir}") from None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        raise UserError(f"{path}: not a lowres-kd probe result (no rows); rerun lowres-kd probe {run_dir}")
    return result


def run_labels(run_dirs: Sequence[Path]) -> List[str]:
    """Each run's folder name; where two share one, enough of their paths to tell them apart."""
    parts = [Path(r).resolve().parts for r in run_dirs]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise UserError("compare: the same run is named twice: " + ", ".join(map(str, run_dirs)))


def describe(result: dict) -> Dict[str, str]:
    """What a run was, from the recipe its probe result carries."""
    r = result.get("recipe") or {}
    get = lambda section, key: str((r.get(section) or {}).get(key, "?"))  # noqa: E731
    return {"mode": get("student", "mode"), "steps": get("train", "steps"), "batch": get("train", "batch_size"),
            "seed": get("train", "seed"), "data": get("data", "source"), "base": str(result.get("base", "?"))}


def _replicate_key(result: dict) -> str:
    """The recipe without its seed and without where the run and its cache were written (its
    name is the default run folder's)."""
    recipe = copy.deepcopy(result.get("recipe") or {})
    for key in ("output_dir", "name"):
        recipe.pop(key, None)
    (recipe.get("train") or {}).pop("seed", None)
    (recipe.get("cache") or {}).pop("dir", None)
    return json.dumps([recipe, result.get("base")], sort_keys=True)


def seed_groups(results: List[dict], labels: List[str]) -> List[Tuple[str, List[int]]]:
    """(label, run indices) of runs whose recipes differ only in their seed, in first-seen order;
    a group's label is its members' common prefix without a trailing ``seed<k>``."""
    groups: Dict[str, List[int]] = {}
    for i, res in enumerate(results):
        groups.setdefault(_replicate_key(res), []).append(i)
    named = []
    for members in groups.values():
        prefix = re.sub(r"[-_/ ]*(seed\d*)?$", "", os.path.commonprefix([labels[i] for i in members]))
        named.append((prefix if len(members) > 1 and prefix else labels[members[0]], members))
    return named


def mean_sd(values: List[float], signed: bool = False) -> str:
    """``0.712 ± 0.004``: the mean and sample standard deviation (a single value alone)."""
    mean = f"{statistics.mean(values):{'+' if signed else ''}.3f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.3f}"


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, labels: Optional[Sequence[str]] = None) -> Path:
    """Write ``compare.md``, ``compare.png`` and ``compare.json`` under ``out_dir``."""
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise UserError("compare: name at least one run directory")
    results = [read_result(r) for r in run_dirs]
    labels = list(labels) if labels else run_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise UserError(f"compare: {len(labels)} labels for {len(run_dirs)} runs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = [scores(res["rows"]) for res in results]
    bases = [res.get("base") for res in results]
    metrics = list(dict.fromkeys(m for res in results for m in headline_metrics(res["rows"])))
    subjects = list(dict.fromkeys(s for t in tables for s, v in t.items() if any(m in v for m in metrics)))

    runs = [describe(res) for res in results]
    keys = list(runs[0])
    parts = [f"# lowres-kd comparison: {', '.join(labels)}", "", "## Runs", "",
             "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    parts += [f"| {label} | " + " | ".join(d[k] for k in keys) + " |" for label, d in zip(labels, runs)]
    parts += ["", "Each score, in brackets its difference to that run's base teacher.", ""]
    for m in metrics:
        parts += [f"## {metric_label(m)}", "", "| subject | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for s in subjects:
            if any(m in t.get(s, {}) for t in tables):
                cells = [score_cell(t.get(s, {}).get(m), None if s == b else t.get(b, {}).get(m))
                         for t, b in zip(tables, bases)]
                parts.append(f"| {s} | " + " | ".join(cells) + " |")
        parts.append("")
    groups = seed_groups(results, labels)
    replicated = len(groups) < len(labels)
    if replicated:
        parts += _spread_tables(groups, tables, bases, metrics, subjects)
    panels = [(metric_label(m), [bar for name, members in groups for s in PLOTTED
                                 if (bar := _group_bar(f"{name}: {s}", s, m, members, tables, bases))])
              for m in metrics]
    if plot_differences(panels, out / "compare.png",
                        "each run's base teacher" + (" (mean over seeds, ± 1 sd)" if replicated else "")):
        parts += ["## Against the base", "", "![comparison](compare.png)", ""]
    (out / "compare.json").write_text(json.dumps({"runs": [{"label": label, "dir": str(d), **desc} for label, d, desc
                                                           in zip(labels, run_dirs, runs)],
                                                  "results": results}, indent=1))
    path = out / "compare.md"
    path.write_text("\n".join(parts))
    return path


def _spread_tables(groups, tables, bases, metrics, subjects) -> List[str]:
    """Per metric: each group's mean ± sd over its seeds, of the score and of its difference to
    the base."""
    parts = ["## Spread over seeds", "",
             "Runs that differ only in their seed, grouped: mean ± sample standard deviation over the seeds "
             "of each score, in brackets of its difference to the run's own base teacher.", "",
             "| group | runs |", "|---|---:|"]
    parts += [f"| {name} | {len(members)} |" for name, members in groups] + [""]
    for m in metrics:
        parts += [f"### {metric_label(m)}", "", "| subject | " + " | ".join(n for n, _ in groups) + " |",
                  "|---|" + "---:|" * len(groups)]
        for s in subjects:
            cells = []
            for _, members in groups:
                values, diffs = _scores_of(s, m, members, tables, bases)
                cells.append((mean_sd(values) if values else "–") + (f" ({mean_sd(diffs, signed=True)})" if diffs else ""))
            if any(c != "–" for c in cells):
                parts.append(f"| {s} | " + " | ".join(cells) + " |")
        parts.append("")
    return parts


def _scores_of(subject, metric, members, tables, bases) -> Tuple[List[float], List[float]]:
    """The group's scores of ``subject`` and, where every run's base has one, their differences."""
    values = [tables[i][subject][metric] for i in members if metric in tables[i].get(subject, {})]
    diffs = [tables[i][subject][metric] - tables[i][bases[i]][metric] for i in members
             if subject != bases[i] and metric in tables[i].get(subject, {}) and metric in tables[i].get(bases[i], {})]
    return values, diffs if diffs and len(diffs) == len(values) else []


def _group_bar(label, subject, metric, members, tables, bases):
    """(label, mean score, mean base, sd of the difference) for the plot; None without scores."""
    values, diffs = _scores_of(subject, metric, members, tables, bases)
    if not values:
        return None
    mean = statistics.mean(values)
    if not diffs:
        return label, mean, None, None
    spread = statistics.stdev(diffs) if len(diffs) > 1 else None
    return label, mean, mean - statistics.mean(diffs), spread
