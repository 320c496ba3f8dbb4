"""``report.md`` with the probe tables and PNG plots (loss curves, probe bars)."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def summary_table(rows: List[dict]) -> str:
    """Markdown table: subjects x (linear accuracy, edge R^2)."""
    table: Dict[str, Dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["probe"] in ("linear", "edges"):
            table[r["subject"]][r["probe"]] = r["value"]
    lines = ["| subject | linear accuracy | edge probe R² |", "|---|---:|---:|"]
    for subject, v in table.items():
        fmt = lambda key: f"{v[key]:.3f}" if key in v else "–"  # noqa: E731
        lines.append(f"| {subject} | {fmt('linear')} | {fmt('edges')} |")
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


def plot_probes(rows: List[dict], out: Path) -> bool:
    probes = [("linear", "accuracy"), ("edges", "r2")]
    fig, axes = plt.subplots(1, len(probes), figsize=(11, 4))
    drawn = False
    for ax, (probe, metric) in zip(axes, probes):
        sel = [r for r in rows if r["probe"] == probe and r["metric"] == metric]
        if sel:
            drawn = True
            ax.barh([r["subject"] for r in sel], [r["value"] for r in sel], color="tab:blue")
            ax.set_title(f"{probe} ({metric})"), ax.invert_yaxis(), ax.grid(axis="x", alpha=0.3)
    fig.tight_layout(), fig.savefig(out, dpi=110), plt.close(fig)
    return drawn


def write_report(run_dir: Path, result: dict) -> Path:
    run_dir = Path(run_dir)
    parts = [f"# lowres-kd report: {run_dir.name}", "", "## Frozen-feature probes", "", summary_table(result["rows"]), ""]
    fid = fidelity_table(result["rows"])
    if fid:
        parts += ["## Fidelity to each teacher (held-out images)", "", fid, ""]
    if plot_losses(run_dir / "log.csv", run_dir / "loss.png"):
        parts += ["## Training loss", "", "![loss](loss.png)", ""]
    if plot_probes(result["rows"], run_dir / "probes.png"):
        parts += ["## Probe scores", "", "![probes](probes.png)", ""]
    if result.get("notes"):
        parts += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
