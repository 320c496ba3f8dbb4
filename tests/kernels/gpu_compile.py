"""Compile every variant of the fused kernels for NVIDIA GPUs, without one: Triton's own LLVM
and its bundled ptxas turn each into a cubin for the given architectures, with the block sizes
and warps that ``lowres_kd.kernels.linear_distill`` picks on a GPU. The interpreter that runs the
kernels in the CPU tests never compiles them; this catches what only compiling finds, and
``--resources`` reports each cubin's registers and spills (cuobjdump, also bundled).

    python tests/kernels/gpu_compile.py --arch 89 90 --resources   # TRITON_INTERPRET must be unset
"""
import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels that this compiles")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowres_kd.kernels import linear_distill as ld  # noqa: E402

WIDTHS = (768, 1280, 5000)  # teacher widths: one tile of 1024, one of 2048, several tiles of 4096
DTYPES = ("bf16", "fp16", "fp32")
# the row kernel's flag sets that the host code launches: mean without row weights (normaliser
# folded), with row weights unfolded (fp16) and the bias gradient off, reduction="none" forward
ROW_FLAGS = {
    "mean": dict(HAS_ROW_SCALE=False, HAS_DEN=False, FOLD_NORM=True, WRITE_GRAD=True, ROW_LOSSES=False, COL_SUMS=True),
    "weighted": dict(HAS_ROW_SCALE=True, HAS_DEN=True, FOLD_NORM=False, WRITE_GRAD=True, ROW_LOSSES=False,
                     COL_SUMS=False),
    "rows": dict(HAS_ROW_SCALE=True, HAS_DEN=False, FOLD_NORM=False, WRITE_GRAD=False, ROW_LOSSES=True, COL_SUMS=False),
}
RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def row_kernel_variants():
    ints = ("n_rows", "n_cols", "stride_p", "stride_t", "stride_part")
    floats = ("w_cos", "w_elem", "beta", "inv_beta", "inv_cols", "eps", "norm")
    for dtype, (distance, (has_cos, elem)), width, (flag_name, flags) in itertools.product(
            DTYPES, ld._KERNEL_DISTANCES.items(), WIDTHS, ROW_FLAGS.items()):
        tiling = ld._tiling(16384, width, torch.device("cuda"), None)
        types = {"P_ptr": f"*{dtype}", "T_ptr": "*bf16", "S_ptr": "*fp32", "DEN_ptr": "*fp32", "LOSS_ptr": "*fp32",
                 "PART_ptr": "*fp32", **{k: "i32" for k in ints}, **{k: "fp32" for k in floats}}
        constants = dict(HAS_COS=has_cos, ELEM=elem, ONE_TILE=tiling.block_c >= width, BLOCK_M=tiling.block_m,
                         BLOCK_C=tiling.block_c, **flags)
        yield f"rows {dtype} {distance} C={width} {flag_name}", ld._distill_rows_kernel, types, constants, tiling.num_warps


def finish_kernel_variants():
    for h_dtype, w_dtype, has_g, has_den in itertools.product(DTYPES, ("bf16", "fp32"), (True, False), (True, False)):
        types = {"G_ptr": "*fp32", "DEN_ptr": "*fp32", "DH_ptr": f"*{h_dtype}", "DW_ptr": "*fp32",
                 "DW_OUT_ptr": f"*{w_dtype}", "DB_ptr": "*fp32", "DB_OUT_ptr": f"*{w_dtype}", "factor": "fp32",
                 **{k: "i32" for k in ("n_dh", "blocks_dh", "n_dw", "blocks_dw", "n_db")}}
        name = f"finish dH {h_dtype} dW {w_dtype} g={has_g} den={has_den}"
        yield name, ld._finish_grads_kernel, types, dict(HAS_G=has_g, HAS_DEN=has_den, BLOCK=4096), 8


def compile_variant(fn, types, constants, arch: int, num_warps: int):
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    constexprs = {(fn.arg_names.index(k),): v for k, v in constants.items()}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def resources(cubin: bytes) -> dict:
    """Registers a thread, stack and local (spill) bytes of a cubin, from the bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    reg, stack, shared, local = map(int, RESOURCE.search(out).groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 86 89 90")
    ap.add_argument("--resources", action="store_true", help="print registers / stack / local bytes per variant")
    args = ap.parse_args(argv)
    started, count = time.perf_counter(), 0
    for arch in args.arch:
        for name, fn, types, constants, warps in itertools.chain(row_kernel_variants(), finish_kernel_variants()):
            kernel = compile_variant(fn, types, constants, arch, warps)
            count += 1
            if args.resources:
                r = resources(kernel.asm["cubin"])
                print(f"sm_{arch} {name} warps={warps}: {r['registers']} registers, stack {r['stack']} B, "
                      f"local {r['local']} B")
    print(f"compiled {count} kernel variants for sm_{', sm_'.join(map(str, args.arch))} "
          f"with triton {triton.__version__} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
