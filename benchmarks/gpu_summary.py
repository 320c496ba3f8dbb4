"""Summarise a benchmarks/gpu_all.sh run: one table of every step (status, seconds, headline
numbers as ratios), printed and written as summary_<device>.{json,md,png} into the run's folder.

    python benchmarks/gpu_summary.py OUT      # OUT: the folder gpu_all.sh wrote (steps.tsv, results/)

Reads OUT/steps.tsv and the JSON files under OUT/results/; imports no torch (it runs last, in
what is left of the time budget). Exit code 1 when a step failed or timed out (skipped steps
and steps left out for a missing package are not failures).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lowres_kd.provenance import git_sha, write_results  # noqa: E402  (no torch at import)


def _span(values: List[Optional[float]], spec: str = ".2f") -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    lo, mid, hi = min(vals), statistics.median(vals), max(vals)
    return f"{mid:{spec}} ({lo:{spec}}-{hi:{spec}})" if len(vals) > 1 else f"{mid:{spec}}"


def _load(folder: Path, pattern: str) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(pattern))]


def headline_tests(res: Path) -> str:
    path = res / "tests.xml"
    if not path.is_file():
        return "no junit file"
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    get = (lambda k: int(suite.get(k, 0))) if suite is not None else (lambda k: 0)
    tests, fail, err, skip = get("tests"), get("failures"), get("errors"), get("skipped")
    return f"{tests - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped"


def headline_kernels(res: Path) -> str:
    runs = [r for r in _load(res, "kernels_*.json") if not r["meta"].get("graphs")]
    if not runs:
        return "no result file"
    run = runs[0]
    rat = run["ratios"]
    if run["meta"]["device"] != "cuda":
        errs = [r.get("grad_rel_err") for r in run["rows"] if r["method"] == "mixed"]
        return f"{len(rat)} shapes on {run['meta']['device']} (no ratios there); mixed grad err vs fp32 {_span(errs, '.1e')}"
    skipped = run["meta"].get("skipped_shapes") or []
    return (f"{len(rat)} shapes{f' ({len(skipped)} not started in time)' if skipped else ''}: fused speed-up vs "
            f"mixed eager {_span([r['fused_vs_mixed_speedup'] for r in rat])}x, vs compile "
            f"{_span([r['fused_vs_compile_speedup'] for r in rat])}x; memory / mixed eager "
            f"{_span([r['fused_over_mixed_memory'] for r in rat], '.3f')}; fused grad err "
            f"{_span([r.get('fused_grad_rel_err') for r in rat], '.1e')} (median, range)")


def headline_teachers(res: Path) -> str:
    runs = _load(res, "teachers_*.json")
    if not runs:
        return "no result file"
    rows = runs[0]["rows"]
    ok = [r for r in rows if not r["error"]]
    skipped = [r for r in rows if (r["error"] or "").startswith("skipped")]
    parts = [f"{len(ok)}/{len(rows)} variants ran"]
    for bits in (8, 4):
        w = [r.get("weights_vs_fp32") for r in ok if r["bits"] == bits and r["vit"] and r["variant"] != "shipped"]
        if any(v is not None for v in w):
            parts.append(f"{bits}-bit ViT weights {_span(w, '.3f')}x fp32")
    hook = [r for r in rows if r.get("shipped_vit")]
    if hook:
        ran = [r for r in hook if not r["error"]]
        parts.append(f"shipped ViT: {len(ran)}/{len(hook)} variants ran" if ran else "shipped ViT: " + hook[0]["error"][:90])
    elif skipped:
        parts.append(f"{len(skipped)} skipped")
    return "; ".join(parts)


def headline_planner(res: Path) -> str:
    runs = _load(res, "planner_*.json")
    if not runs:
        return "no result file"
    run = runs[0]
    parts = []
    for c in run["configs"]:
        if c.get("budget_bytes"):
            peak = c.get("measured_peak_bytes")
            parts.append(f"{c['config']}: planner {c['estimated_total_bytes'] / 2**30:.2f} GiB "
                         f"({'fits' if c['planner_fits'] else 'no fit'}) / measured "
                         + ("-" if peak is None else f"{peak / 2**30:.2f} GiB (estimate/measured "
                            f"{c['estimated_total_bytes'] / max(peak, 1):.2f})")
                         + (" OOM" if c.get("oom") else ""))
        else:
            errs = [abs(r["error"]) for r in c["rows"] if r["error"] is not None]
            parts.append(f"{c['config']}: worst component error {max(errs, default=0):.1%}")
    parts += [f"skipped {s}" for s in run.get("skipped", [])]
    parts += [f"FAILED {s}" for s in run.get("failed", [])]
    return "; ".join(parts) or "no configuration"


def headline_train(res: Path, tag: str) -> str:
    runs = [r for r in _load(res, f"train_{tag}_*.json")]
    if not runs:
        return "no result file"
    parts = []
    for r in runs[0]["rows"]:
        if r.get("fits"):
            parts.append(f"{r['name']}: {r['images_per_s']:.1f} img/s, {r.get('throughput_vs_naive', 0):.2f}x naive, "
                         f"memory {r.get('memory_vs_naive', 0):.2f}x"
                         + (f" [{r['target']}: {'met' if r['target_met'] else 'missed'}]" if "target" in r else ""))
        else:
            parts.append(f"{r['name']}: {(r.get('error') or 'no result')[:80]}")
    return "; ".join(parts)


def read_steps(out: Path) -> List[Dict]:
    steps = []
    path = out / "steps.tsv"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        name, status, rc, seconds, limit = (line.split("\t") + ["", "", "", ""])[:5]
        steps.append({"step": name, "status": status, "exit": rc, "seconds": int(seconds or 0), "timeout": limit})
    return steps


def read_env(res: Path) -> Dict:
    info = {}
    path = res / "env.txt"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        key, _, value = line.partition(" ")
        info[key] = value.strip()
    gpu = info.get("gpu")
    return {"device": "cuda" if gpu else "cpu", "device_name": gpu.split(",")[0].strip() if gpu else "cpu (dry run)",
            "git_sha": info.get("git_sha") or git_sha(REPO),
            **{k: info.get(k) for k in ("python", "torch", "triton", "timm", "peft", "bitsandbytes", "deepspeed")},
            "dry_run": info.get("dry_run") == "1"}


def summarise(out: Path) -> Dict:
    res = out / "results"
    env = read_env(res)
    heads = {"tests": lambda: headline_tests(res), "kernels": lambda: headline_kernels(res),
             "teachers": lambda: headline_teachers(res), "planner": lambda: headline_planner(res)}
    rows = []
    for s in read_steps(out):
        tag = re.fullmatch(r"train-(\w+)", s["step"])
        fn = (lambda t=tag.group(1): headline_train(res, t)) if tag else heads.get(s["step"])
        try:
            head = fn() if fn else ""
        except Exception as exc:  # a half-written result file: say so, keep summarising
            head = f"unreadable result: {type(exc).__name__}: {exc}"[:200]
        rows.append({**s, "headline": head})
    failed = [r["step"] for r in rows if r["status"] in ("failed", "timeout")]
    return {"env": env, "steps": rows, "failed": failed, "seconds": sum(r["seconds"] for r in rows)}


def markdown(summary: Dict) -> str:
    env = summary["env"]
    lines = [f"# gpu_all.sh summary ({env['device_name']}{', dry run' if env['dry_run'] else ''})", "",
             f"git {env['git_sha']}; python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
             f"timm {env['timm']}, bitsandbytes {env['bitsandbytes']}, deepspeed {env['deepspeed']}", "",
             "| step | status | seconds | timeout | headline |", "|---|---|---|---|---|"]
    for r in summary["steps"]:
        lines.append(f"| {r['step']} | {r['status']}{'' if r['exit'] in ('0', '-') else ' (exit ' + r['exit'] + ')'} | "
                     f"{r['seconds']} | {r['timeout']} | {r['headline'].replace('|', '/')} |")
    lines += ["", f"Steps: {summary['seconds']} s in all. "
              + (f"FAILED: {', '.join(summary['failed'])}." if summary["failed"] else "No step failed.")]
    return "\n".join(lines) + "\n"


def plot(path: Path, summary: Dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ok": "tab:green", "failed": "tab:red", "timeout": "tab:orange", "skipped": "tab:gray"}
    steps = summary["steps"]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(steps) + 1.2))
    ax.barh([s["step"] for s in steps], [s["seconds"] for s in steps],
            color=[colours.get(s["status"], "k") for s in steps])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (green ok, red failed, orange timeout, grey skipped)")
    ax.set_title(f"gpu_all.sh, {summary['env']['device_name']}, git {summary['env']['git_sha']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the folder benchmarks/gpu_all.sh wrote")
    args = ap.parse_args(argv)
    summary = summarise(args.out)
    text = markdown(summary)
    write_results(args.out, "summary", summary["env"], summary, lambda p: p.write_text(text), lambda p: plot(p, summary))
    print(text, end="")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
