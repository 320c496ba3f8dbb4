"""benchmarks/tune_rows.py: every tiling it times is first checked against fp32 autograd, on CPU
through the interpreter; its files are written."""
import json
import os

import pytest
import torch

from helpers import load_benchmark

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the row kernel: interpreter")


def test_tune_rows_cpu_checks_every_tiling_and_writes_files(tmp_path):
    tune = load_benchmark("tune_rows")
    result = tune.main(["--device", "cpu", "--out", str(tmp_path), "--rows", "37", "--widths", "40", "130",
                        "--tiles", "128", "1024", "--rows-per-program", "8", "--warmup", "0", "--repeats", "2"])
    js, md, png = (tmp_path / f"rows_cpu.{ext}" for ext in ("json", "md", "png"))
    assert json.loads(js.read_text()) == json.loads(json.dumps(result))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = result["rows"]
    # C=130 at tile 128: the row split in two tiles (the multi-tile path); tile = what ran
    assert [(r["C"], r["block_m"], r["block_c"], r["tile"]) for r in rows] == [
        (40, 2, 64, 128), (40, 16, 64, 1024), (130, 1, 128, 128), (130, 4, 256, 1024)]
    for r in rows:  # bf16 dP: within its rounding of the fp32 gradient, and timed
        assert r["error"] is None and 0 < r["max_rel_err"] < 2e-2 and r["median_ms"] > 0 and r["timed_as"] == "launches"
    assert "interpreter" in md.read_text() and "| 40 | 37 | 1024 | 8 | 16x64 |" in md.read_text()


def test_tune_rows_fp16_checks_the_unfolded_gradient(tmp_path):
    """fp16 runs the kernel as the op does (dP not divided by N) and checks it as such."""
    tune = load_benchmark("tune_rows")
    result = tune.main(["--device", "cpu", "--out", str(tmp_path), "--dtype", "fp16", "--rows", "29", "--widths", "40",
                        "--tiles", "1024", "--rows-per-program", "8", "--warmup", "0", "--repeats", "1"])
    (row,) = result["rows"]
    assert row["error"] is None and row["max_rel_err"] < 2e-2


def test_tune_rows_check_fails_on_a_wrong_kernel_result():
    """The check is real: the kernel run for one distance does not pass as another, an unfolded
    gradient does not pass as a folded one, and NaN is never a pass."""
    tune = load_benchmark("tune_rows")
    from lowres_kd_kernels import linear_distill as ld

    p, t = torch.randn(21, 40), torch.randn(21, 40)
    tiling = ld._tiling(21, 40, p.device.type, None)
    cos = ld._distance("cos", tune.ALPHA, tune.BETA)
    for fold in (True, False, True):  # repeated on the same fp32 input: nothing accumulates
        assert tune._check(tiling, p, t, cos, "cos", fold=fold) < 1e-5
    assert tune._check(tiling, p, t, ld._distance("mse", tune.ALPHA, tune.BETA), "cos", fold=True) > 0.5
    p[3, 5] = float("nan")
    assert tune._check(tiling, p, t, cos, "cos", fold=True) == float("inf")


def test_tune_rows_rejects_bad_arguments(tmp_path):
    tune = load_benchmark("tune_rows")
    with pytest.raises(SystemExit, match="--tiles: \\[300\\] are not positive powers of two"):
        tune.main(["--device", "cpu", "--out", str(tmp_path), "--tiles", "300"])
    with pytest.raises(SystemExit, match="--widths: values must be positive"):
        tune.main(["--device", "cpu", "--out", str(tmp_path), "--widths", "0"])
