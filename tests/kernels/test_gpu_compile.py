"""The fused kernels compile for consumer (sm_89) and data-centre (sm_90) GPUs, checked on a
machine without one (tests/kernels/gpu_compile.py: Triton's LLVM and bundled ptxas)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gpu_compile.py")


def test_every_kernel_variant_compiles_for_sm89_and_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "89", "90"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 156 kernel variants for sm_89, sm_90" in proc.stdout, proc.stdout
