"""``lowres-kd compare`` and the report's tables: every score next to its difference to the base."""
import json
import re

import numpy as np
import pytest

from lowres_kd.cli import main
from lowres_kd.errors import UserError
from lowres_kd.evaluation import compare_runs
from lowres_kd.evaluation.report import summary_table

PNG = b"\x89PNG\r\n\x1a\n"
SUBJECTS = ["student", "student@init", "scratch", "teacher:base", "teacher:edges"]
METRICS = [("linear", "accuracy"), ("edges", "r2")]


def scored_run(path, mode, rng, seed=0):
    """A run folder holding a probe result with random scores (and a fidelity row, not a headline)."""
    rows = [{"probe": p, "subject": s, "metric": m, "value": float(rng.uniform(0, 1))}
            for p, m in METRICS for s in SUBJECTS]
    rows.append({"probe": "fidelity", "subject": "edges", "metric": "cos_dense_raw", "value": 0.9})
    path.mkdir(parents=True)
    recipe = {"student": {"mode": mode}, "train": {"steps": 60, "batch_size": 8, "seed": seed}, "data": {"source": "embedded"}}
    (path / "probes.json").write_text(json.dumps({"base": "teacher:base", "recipe": recipe, "rows": rows}))
    return {(r["probe"], r["metric"], r["subject"]): r["value"] for r in rows}


def cells(markdown: str, heading: str) -> dict:
    """{(subject, column): cell text} of the table under ``## heading``."""
    block = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [l for l in block.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        c = [x.strip() for x in line.strip("|").split("|")]
        out.update({(c[0], col): text for col, text in zip(header[1:], c[1:])})
    return out


def test_compare_puts_each_run_beside_the_others(tmp_path):
    rng = np.random.default_rng()
    modes = ["adapter", "full", "scratch"]
    truth = {m: scored_run(tmp_path / m, m, rng) for m in modes}
    assert main(["compare", *(str(tmp_path / m) for m in modes), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == PNG
    runs = cells(md, "Runs")
    assert [runs[(m, "mode")] for m in modes] == modes and runs[("full", "steps")] == "60"
    for probe, metric in METRICS:
        table = cells(md, f"{probe} ({metric})")
        for m in modes:
            base = truth[m][(probe, metric, "teacher:base")]
            assert table[("teacher:base", m)] == f"{base:.3f}"
            for s in SUBJECTS[:3] + ["teacher:edges"]:
                v = truth[m][(probe, metric, s)]
                value, diff = re.fullmatch(r"(\S+) \((\S+)\)", table[(s, m)]).groups()
                assert float(value) == pytest.approx(v, abs=5e-4) and float(diff) == pytest.approx(v - base, abs=5e-4)
    assert "fidelity" not in md
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["label"] for r in saved["runs"]] == modes


def test_runs_that_differ_only_in_their_seed_report_their_spread(tmp_path):
    rng = np.random.default_rng()
    labels = ["adapter-seed0", "adapter-seed1", "adapter-seed2", "scratch-seed0"]
    truth = [scored_run(tmp_path / label, label.split("-")[0], rng, seed=int(label[-1])) for label in labels]
    for i, label in enumerate(labels):  # a replicate may have its own name and cache folder
        data = json.loads((tmp_path / label / "probes.json").read_text())
        data["recipe"].update(name="demo" if i == 0 else label, cache={"dir": str(tmp_path / label / "cache")})
        (tmp_path / label / "probes.json").write_text(json.dumps(data))
    compare_runs([tmp_path / label for label in labels], tmp_path / "cmp", labels=labels)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == PNG
    groups = cells(md, "Spread over seeds")
    assert groups[("adapter", "runs")] == "3" and groups[("scratch-seed0", "runs")] == "1"
    for probe, metric in METRICS:
        block = md.split(f"### {probe} ({metric})\n", 1)[1].split("\n#", 1)[0]
        rows = {l.split("|")[1].strip(): [c.strip() for c in l.strip("|").split("|")[1:]]
                for l in block.splitlines() if l.startswith("| ") and not l.startswith("| subject")}
        v = np.array([t[(probe, metric, "student")] for t in truth[:3]])
        d = v - np.array([t[(probe, metric, "teacher:base")] for t in truth[:3]])
        assert rows["student"][0] == f"{v.mean():.3f} ± {v.std(ddof=1):.3f} ({d.mean():+.3f} ± {d.std(ddof=1):.3f})"
        single = truth[3][(probe, metric, "student")] - truth[3][(probe, metric, "teacher:base")]
        assert rows["student"][1] == f"{truth[3][(probe, metric, 'student')]:.3f} ({single:+.3f})"
    # a run that differs in more than its seed is not a replicate
    other = tmp_path / "other"
    scored_run(other, "adapter", rng, seed=3)
    data = json.loads((other / "probes.json").read_text())
    data["recipe"]["train"]["steps"] = 61
    (other / "probes.json").write_text(json.dumps(data))
    compare_runs([tmp_path / "adapter-seed0", other], tmp_path / "cmp2")
    assert "Spread over seeds" not in (tmp_path / "cmp2" / "compare.md").read_text()


def test_report_table_marks_the_difference_to_the_base():
    rows = [{"probe": "knn", "subject": s, "metric": "accuracy", "value": v}
            for s, v in [("teacher:base", 0.5), ("student", 0.625), ("scratch", 0.25)]]
    table = summary_table(rows, base="teacher:base")
    assert "| teacher:base | 0.500 |" in table
    assert "| student | 0.625 (+0.125) |" in table and "| scratch | 0.250 (-0.250) |" in table


def test_compare_refuses_an_unscored_run_and_names_it(tmp_path):
    (tmp_path / "unscored").mkdir()
    with pytest.raises(UserError, match=r"unscored: no probes.json; score the run first: lowres-kd probe"):
        compare_runs([tmp_path / "unscored"], tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "probes.json").write_text("{not json")
    with pytest.raises(UserError, match=r"bad/probes.json: unreadable"):
        compare_runs([tmp_path / "bad"], tmp_path / "out")
    rng = np.random.default_rng()
    scored_run(tmp_path / "a" / "run", "adapter", rng)
    scored_run(tmp_path / "b" / "run", "full", rng)
    compare_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "out")  # labels a/run, b/run
    assert "| a/run | adapter |" in (tmp_path / "out" / "compare.md").read_text()
    with pytest.raises(UserError, match="2 labels for 1 runs"):
        compare_runs([tmp_path / "a" / "run"], tmp_path / "out", labels=["x", "y"])
