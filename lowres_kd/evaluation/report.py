"""``report.md`` with the probe tables and PNG plots (loss curves, each score against the base's).

A 0.5-point change is invisible on a full axis, so the probe plots draw every subject's score
minus the base teacher's, each bar labelled with the score and the difference.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Metric = Tuple[str, str, str]  # (probe, metric, what it was scored on: labelled set, input size; or "")


def metric_of(row: dict, with_size: bool = True) -> Metric:
    on = [str(row["dataset"])] if row.get("dataset") else []
    if with_size and row.get("image_size"):
        on.append(f"{row['image_size']} px")
    return row["probe"], row["metric"], ", ".join(on)


def headline_metrics(rows: List[dict]) -> List[Metric]:
    """Every (probe, metric, set) the rows score, in the order the probes ran; fidelity has a
    table of its own."""
    return list(dict.fromkeys(metric_of(r) for r in rows if r["probe"] != "fidelity"))


def scores(rows: List[dict]) -> Dict[str, Dict[Metric, float]]:
    """subject -> {(probe, metric, set): value}."""
    table: Dict[str, Dict[Metric, float]] = defaultdict(dict)
    for r in rows:
        table[r["subject"]][metric_of(r)] = r["value"]
    return table


def metric_label(metric: Metric) -> str:
    """``linear (accuracy)``, or ``linear (accuracy, fashion_mnist, 112 px)`` for a probe on a
    named set or at a swept input size."""
    probe, name, dataset = metric
    return f"{probe} ({name}, {dataset})" if dataset else f"{probe} ({name})"


def score_cell(value: Optional[float], base: Optional[float]) -> str:
    """``0.720 (+0.080)``: the score and, where the base's is known, the difference to it."""
    if value is None:
        return "–"
    return f"{value:.3f}" if base is None else f"{value:.3f} ({value - base:+.3f})"


def summary_table(rows: List[dict], base: Optional[str] = None) -> str:
    """Markdown table: subjects x every headline metric; cells carry the difference to ``base``
    (a subject name, e.g. ``teacher:mobilenet``) where it has a score."""
    metrics, table = headline_metrics(rows), scores(rows)
    ref = table.get(base, {})
    lines = ["| subject | " + " | ".join(metric_label(m) for m in metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for subject, v in table.items():
        if any(m in v for m in metrics):
            cells = [score_cell(v.get(m), None if subject == base else ref.get(m)) for m in metrics]
            lines.append(f"| {subject} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fidelity_table(rows: List[dict]) -> str:
    table: Dict[str, Dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["probe"] == "fidelity":
            table[r["subject"]][r["metric"]] = r["value"]
    if not table:
        return ""
    metrics = ["cos_global_normalised", "cos_dense_normalised", "cos_global_raw", "cos_dense_raw"]
    lines = ["| teacher | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for teacher, v in table.items():
        lines.append(f"| {teacher} | " + " | ".join(f"{v.get(m, float('nan')):.3f}" for m in metrics) + " |")
    return "\n".join(lines)


def plot_losses(log_path: Path, out: Path) -> bool:
    if not log_path.is_file():
        return False
    with log_path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return False
    steps = [int(r["step"]) for r in rows]
    keys = [k for k in rows[0] if k == "loss" or k.endswith(("/global", "/dense"))]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot(steps, [float(r[k] or "nan") for r in rows], label=k, lw=2 if k == "loss" else 1)  # skipped steps: gaps
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(out, dpi=110), plt.close(fig)
    return True


Bar = Tuple  # (label, value, base value or None[, spread: a standard deviation or None])


def plot_differences(panels: List[Tuple[str, List[Bar]]], out: Path, base_name: str = "the base") -> bool:
    """One panel per metric: a bar per (label, value, base value), drawn as value - base and
    labelled with both, with an error bar where a bar carries its spread; absolute values where
    the base is unknown."""
    panels = [p for p in panels if p[1]]
    if not panels:
        return False
    height = max(2.5, 0.35 * max(len(bars) for _, bars in panels) + 1.2)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), height), squeeze=False)
    for ax, (title, bars) in zip(axes[0], panels):
        labels = [b[0] for b in bars]
        known = all(b[2] is not None for b in bars)
        heights = [b[1] - b[2] if known else b[1] for b in bars]
        colors = ["tab:green" if h > 0 else "tab:red" if h < 0 else "tab:gray" for h in heights] if known else "tab:blue"
        spread = [b[3] if len(b) > 3 and b[3] is not None else 0.0 for b in bars]
        ax.barh(labels, heights, color=colors, xerr=spread if any(spread) else None, capsize=3)
        for y, (h, e, b) in enumerate(zip(heights, spread, bars)):  # the label beyond the error bar
            ax.annotate(score_cell(b[1], b[2]), (h + e if h >= 0 else h - e, y), xytext=(3 if h >= 0 else -3, 0),
                        textcoords="offset points", ha="left" if h >= 0 else "right", va="center", fontsize=7)
        if known:
            ax.axvline(0, color="black", lw=0.8)
            ax.set_xlabel(f"difference to {base_name}")
        lo = min([h - e for h, e in zip(heights, spread)] + [0])
        hi = max([h + e for h, e in zip(heights, spread)] + [0])
        pad = 0.45 * (hi - lo or 1.0)  # room for the labels
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_title(title), ax.invert_yaxis(), ax.grid(axis="x", alpha=0.3), ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout(), fig.savefig(out, dpi=110), plt.close(fig)
    return True


def plot_probes(rows: List[dict], out: Path, base: Optional[str] = None) -> bool:
    """Every subject's score on each headline metric against ``base``'s."""
    table = scores(rows)
    ref = table.get(base, {})
    panels = [(metric_label(m), [(s, v[m], ref.get(m)) for s, v in table.items() if m in v and s != base])
              for m in headline_metrics(rows)]
    return plot_differences(panels, out, base or "the base")


# the subjects drawn against input size: the student, its two baselines and the base
SWEPT = ("student", "student@init", "scratch")


def plot_resolution(rows: List[dict], out: Path, base: Optional[str] = None) -> bool:
    """One panel per metric: score against input size, a line per subject (the base teacher's
    dashed: it runs at its own size, so only the images' resolution changes for it)."""
    sized = [r for r in rows if r.get("image_size") and r["probe"] != "fidelity"]
    metrics = list(dict.fromkeys(metric_of(r, with_size=False) for r in sized))
    if not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for subject in SWEPT + ((base,) if base else ()):
            points = sorted((r["image_size"], r["value"]) for r in sized
                            if r["subject"] == subject and metric_of(r, with_size=False) == m)
            if points:
                ax.plot(*zip(*points), marker="o", label=subject, ls="--" if subject == base else "-")
        ax.set_title(metric_label(m), fontsize=9), ax.set_xlabel("input size (px)"), ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out, dpi=110), plt.close(fig)
    return True


def write_report(run_dir: Path, result: dict) -> Path:
    run_dir = Path(run_dir)
    base = result.get("base")
    parts = [f"# lowres-kd report: {run_dir.name}", "", "## Frozen-feature probes", ""]
    if base:
        parts += [f"Each score, in brackets its difference to the base teacher ({base}).", ""]
    parts += [summary_table(result["rows"], base), ""]
    fid = fidelity_table(result["rows"])
    if fid:
        parts += ["## Fidelity to each teacher (held-out images)", "", fid, ""]
    if plot_losses(run_dir / "log.csv", run_dir / "loss.png"):
        parts += ["## Training loss", "", "![loss](loss.png)", ""]
    if plot_probes(result["rows"], run_dir / "probes.png", base):
        parts += ["## Probe scores against the base", "", "![probes](probes.png)", ""]
    if result.get("sizes") and plot_resolution(result["rows"], run_dir / "resolution.png", base):
        parts += ["## Scores against input size", "", f"Input sizes {result['sizes']}: the student, student@init and "
                  "scratch run at each; every teacher at its own input size on the resized images.", "",
                  "![resolution](resolution.png)", ""]
    if result.get("notes"):
        parts += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    env = result.get("env")
    if env:
        parts += [f"Scored on {env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
                  f"git {env['git_sha']}, in {result.get('seconds', 0):.0f} s.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
