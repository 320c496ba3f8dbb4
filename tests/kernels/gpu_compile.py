"""Compile every variant of the fused kernels for NVIDIA GPUs, without one: Triton's own LLVM
and its bundled ptxas turn each into a cubin for the given architectures. The interpreter that
runs the kernels in the CPU tests never compiles them; this catches what only compiling finds.

    python tests/kernels/gpu_compile.py --arch 89 90     # (TRITON_INTERPRET must be unset)
"""
import argparse
import itertools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels that this compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowres_kd.kernels import linear_distill as ld  # noqa: E402

# row kernel: the flag sets the host code launches (mean / sum with and without row weights, the
# fp16 unfolded path, reduction="none" forward)
ROW_FLAGS = [
    dict(HAS_ROW_SCALE=False, HAS_DEN=False, FOLD_NORM=True, WRITE_GRAD=True, ROW_LOSSES=False, COL_SUMS=True),
    dict(HAS_ROW_SCALE=True, HAS_DEN=True, FOLD_NORM=False, WRITE_GRAD=True, ROW_LOSSES=False, COL_SUMS=False),
    dict(HAS_ROW_SCALE=True, HAS_DEN=False, FOLD_NORM=False, WRITE_GRAD=False, ROW_LOSSES=True, COL_SUMS=False),
]
DTYPES = ("bf16", "fp16", "fp32")


def _compile(fn, types, constants, target, num_warps):
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    constexprs = {(fn.arg_names.index(k),): v for k, v in constants.items()}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                   options={"num_warps": num_warps})


def row_kernel_variants():
    ints = ("n_rows", "n_cols", "stride_p", "stride_t", "stride_part")
    floats = ("w_cos", "w_elem", "beta", "inv_beta", "inv_cols", "eps", "norm")
    for dtype, (has_cos, elem), one_tile, flags in itertools.product(
            DTYPES, ld._KERNEL_DISTANCES.values(), (True, False), ROW_FLAGS):
        block_c = 2048 if one_tile else 1024  # C = 1280: one tile, or two (1024 wide)
        types = {"P_ptr": f"*{dtype}", "T_ptr": "*bf16", "S_ptr": "*fp32", "DEN_ptr": "*fp32", "LOSS_ptr": "*fp32",
                 "PART_ptr": "*fp32", **{k: "i32" for k in ints}, **{k: "fp32" for k in floats}}
        constants = dict(HAS_COS=has_cos, ELEM=elem, ONE_TILE=one_tile, BLOCK_M=max(1, 4096 // block_c),
                         BLOCK_C=block_c, **flags)
        yield ld._distill_rows_kernel, types, constants


def finish_kernel_variants():
    for h_dtype, w_dtype, has_g, has_den in itertools.product(DTYPES, ("bf16", "fp32"), (True, False), (True, False)):
        types = {"G_ptr": "*fp32", "DEN_ptr": "*fp32", "DH_ptr": f"*{h_dtype}", "DW_ptr": "*fp32",
                 "DW_OUT_ptr": f"*{w_dtype}", "DB_ptr": "*fp32", "DB_OUT_ptr": f"*{w_dtype}", "factor": "fp32",
                 **{k: "i32" for k in ("n_dh", "blocks_dh", "n_dw", "blocks_dw", "n_db")}}
        yield ld._finish_grads_kernel, types, dict(HAS_G=has_g, HAS_DEN=has_den, BLOCK=4096)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 86 89 90")
    args = ap.parse_args(argv)
    started, count = time.perf_counter(), 0
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for fn, types, constants in itertools.chain(row_kernel_variants(), finish_kernel_variants()):
            _compile(fn, types, constants, target, num_warps=8)
            count += 1
    print(f"compiled {count} kernel variants for sm_{', sm_'.join(map(str, args.arch))} "
          f"with triton {triton.__version__} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
