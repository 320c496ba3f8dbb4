"""The fused kernels compile for consumer (sm_89) and data-centre (sm_90) GPUs, checked on a
machine without one (tests/kernels/gpu_compile.py: Triton's LLVM and bundled ptxas), with the
block sizes the kernel module picks, and without register spills in the row kernel."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gpu_compile.py")
LINE = re.compile(r"^sm_(\d+) (rows|finish) (.*) warps=(\d+): (\d+) registers, stack (\d+) B, local (\d+) B$")


def test_every_kernel_variant_compiles_for_sm89_and_sm90_without_spills(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "89", "90", "--resources"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 210 kernel variants for sm_89, sm_90" in proc.stdout, proc.stdout[-2000:]
    rows = [m.groups() for m in map(LINE.match, proc.stdout.splitlines()) if m]
    assert len(rows) == 210
    for arch, kind, name, warps, regs, stack, local in rows:
        assert int(local) == 0 and int(stack) <= 8, (arch, kind, name)  # nothing spilled to local memory
        if kind == "rows" and "mean" in name and "C=5000" not in name:  # one tile: the rows held in registers
            programs = 65536 // (int(regs) * int(warps) * 32)  # 64k registers an SM on sm_89 and sm_90
            assert programs >= 3, (arch, name, regs, warps)
