"""benchmarks/gpu_all.sh: the one lent-GPU script. Its --dry-run runs every step on the CPU at tiny
sizes and must leave each step's JSON/MD/PNG, the packed results and the summary; a step that
fails must not stop the others, and the summary must name it."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_all.sh"
STEPS = ["install", "tests", "kernels", "teachers", "planner", "train-dry"]


def _run(tmp_path, *args, python=sys.executable, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": python,
                               "LOWRES_KD_GIT_SHA": "abc1234", **env})


def _steps(out: Path):
    return {line.split("\t")[0]: line.split("\t")[1] for line in (out / "steps.tsv").read_text().splitlines()}


@pytest.mark.slow
def test_dry_run_writes_every_steps_files_and_the_summary_last(tmp_path):
    done = _run(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert _steps(out) == {"install": "skipped", **{s: "ok" for s in STEPS[1:]}}
    res = out / "results"
    for stem in ("kernels_cpu", "teachers_cpu", "planner_cpu", "train_dry_cpu"):
        for ext in ("json", "md", "png"):
            assert (res / f"{stem}.{ext}").stat().st_size > 0, (stem, ext)
        assert json.loads((res / f"{stem}.json").read_text())  # whole JSON, not a half-written file
    assert (res / "tests.xml").is_file() and "git_sha abc1234" in (res / "env.txt").read_text()
    with tarfile.open(out / "results.tgz") as tar:
        assert "results/kernels_cpu.json" in tar.getnames() and "results/train_dry_cpu.png" in tar.getnames()
    summary = json.loads((out / "summary_cpu.json").read_text())
    assert summary["failed"] == [] and [s["step"] for s in summary["steps"]] == STEPS
    assert summary["env"]["git_sha"] == "abc1234" and summary["env"]["dry_run"] is True
    heads = {s["step"]: s["headline"] for s in summary["steps"]}
    assert "mixed grad err" in heads["kernels"] and "shipped ViT" in heads["teachers"]
    assert "needs CUDA" in heads["planner"] and "cache:" in heads["train-dry"] and "naive:" in heads["train-dry"]
    assert (out / "summary_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the summary table is what prints last
    lines = done.stdout.strip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("| step | status"))
    table = [line for line in lines[header + 2:] if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in table] == STEPS
    assert lines[-1].startswith("Steps:") and "No step failed" in lines[-1]
    # the benchmarks took CPU flags: nothing in the log says CUDA was asked for
    assert "--device cuda" not in (out / "log.txt").read_text()


def test_a_failing_step_does_not_stop_the_rest_and_the_summary_names_it(tmp_path):
    """A stand-in python: bench_kernels.py fails, every other benchmark 'succeeds' at once, the
    summariser and the environment probe are the real interpreter."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *benchmarks/bench_kernels.py*) echo "kernels broke" >&2; exit 3 ;;
  *gpu_summary.py*|-) exec {sys.executable} "$@" ;;
  *) exit 0 ;;
esac
""")
    fake.chmod(0o755)
    done = _run(tmp_path, "--dry-run", python=str(fake))
    out = tmp_path / "out"
    assert done.returncode == 1, done.stdout[-2000:]
    assert _steps(out) == {"install": "skipped", "tests": "ok", "kernels": "failed", "teachers": "ok",
                           "planner": "ok", "train-dry": "ok"}
    summary = json.loads((out / "summary_cpu.json").read_text())
    assert summary["failed"] == ["kernels"]
    assert "FAILED: kernels." in done.stdout.strip().splitlines()[-1]
    assert "kernels broke" in (out / "log.txt").read_text()


def test_help_and_unknown_arguments():
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "--dry-run" in done.stdout and "pip download" in done.stdout
    assert "set -u" not in done.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
