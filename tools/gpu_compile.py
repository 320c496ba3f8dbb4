"""Compile every variant of the fused kernels for NVIDIA GPUs, without one: Triton's own LLVM
and its bundled ptxas turn each into a cubin for the given architectures, with the block sizes
and warps that ``lowres_kd_kernels.linear_distill`` picks on a GPU. The interpreter that runs the
kernels in the CPU tests never compiles them; this catches what only compiling finds, and
``--resources`` reports each cubin's registers and spills (cuobjdump and ptxas -v, also bundled).

    python tools/gpu_compile.py --arch 89 90 --resources   # TRITON_INTERPRET must be unset
"""
import argparse
import contextlib
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels that this compiles")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowres_kd_kernels import linear_distill as ld  # noqa: E402

WIDTHS = (768, 1280, 5000)  # teacher widths: one tile of 1024, one of 2048, several tiles of 4096
DTYPES = ("bf16", "fp16", "fp32")  # Triton names of the op's dtypes
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# every way a caller can use the op: reduction x row weights x bias x gradients on/off
CALLS = list(itertools.product(("mean", "sum", "none"), (False, True), (True, False), (True, False)))
# (hidden, target) dtypes: the target as the hidden states, or fp32 (the trainer's bf16 heads get
# fp32 normalised targets)
DTYPE_PAIRS = [("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"), ("fp32", "fp32")]


@contextlib.contextmanager
def recorded_row_launches():
    """The compile-time arguments of every row-kernel launch the op's host code makes meanwhile
    (``_row_constexprs`` runs on meta too, where the launches themselves are skipped)."""
    calls, original = [], ld._row_constexprs

    def record(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    ld._row_constexprs = record
    try:
        yield calls
    finally:
        ld._row_constexprs = original


def _run_on_meta(dtype, target_dtype, distance, width, reduction, weighted, bias, grad):
    """One forward (and backward, with gradients) of the op on meta tensors: its host code only."""
    n, k, dt = 4096, 64, TORCH_DTYPES[dtype]
    h = torch.empty(n, k, device="meta", dtype=dt, requires_grad=grad)
    w = torch.empty(width, k, device="meta", dtype=dt, requires_grad=grad)
    b = torch.empty(width, device="meta", dtype=dt, requires_grad=grad) if bias else None
    t = torch.empty(n, width, device="meta", dtype=TORCH_DTYPES[target_dtype])
    rw = torch.empty(n, device="meta") if weighted else None
    with torch.set_grad_enabled(grad):
        loss = ld.fused_linear_distill_triton(h, w, b, t, rw, distance=distance, reduction=reduction)
        if grad:
            loss.sum().backward()


def row_kernel_variants():
    """Each distinct row-kernel variant the host code launches, over DTYPE_PAIRS, distances, widths
    and CALLS: the compile-time arguments come from running the op, so a new flag or call path
    cannot be missed here (the pointer dtypes are those of the tensors passed)."""
    seen = set()
    ints = ("n_rows", "n_cols", "stride_p", "stride_t", "stride_part")
    floats = ("w_cos", "w_elem", "beta", "inv_beta", "inv_cols", "eps", "norm")
    for (dtype, t_dtype), distance, width, call in itertools.product(DTYPE_PAIRS, ld._KERNEL_DISTANCES, WIDTHS, CALLS):
        with recorded_row_launches() as launches:
            _run_on_meta(dtype, t_dtype, distance, width, *call)
        for constexprs in launches:
            key = (dtype, t_dtype, tuple(sorted(constexprs.items())))
            if key in seen:
                continue
            seen.add(key)
            constants = dict(constexprs)
            warps = constants.pop("num_warps")
            types = {"P_ptr": f"*{dtype}", "T_ptr": f"*{t_dtype}", "S_ptr": "*fp32", "DEN_ptr": "*fp32", "LOSS_ptr": "*fp32",
                     "PART_ptr": "*fp32", **{k: "i32" for k in ints}, **{k: "fp32" for k in floats}}
            flags = " ".join(name for name, on in constants.items() if on is True)
            target = "" if t_dtype == dtype else f" T {t_dtype}"
            yield f"rows {dtype}{target} {distance} C={width} {flags}", ld._distill_rows_kernel, types, constants, warps


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


def _bundled(tool: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def resources(kernel) -> dict:
    """Registers a thread, stack frame, local and spilled bytes of a compiled kernel. cuobjdump reads
    the cubin; these kernels keep no local arrays, so a stack frame means spills, and then ptxas -v
    (bundled too) compiles the PTX again to say how many bytes were spilled."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([_bundled("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    reg, stack, _, local = map(int, RESOURCE.search(out).groups())
    spilled = 0
    if stack:
        ptx = kernel.asm["ptx"]
        with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
            f.write(ptx)
            f.flush()
            arch = re.search(r"^\.target (sm_\w+)", ptx, re.M).group(1)
            info = subprocess.run([_bundled("ptxas"), "-v", "--gpu-name", arch, f.name, "-o", os.devnull],
                                  capture_output=True, text=True, check=True).stderr
        spilled = int(re.search(r"(\d+) bytes spill stores", info).group(1))
    return {"registers": reg, "stack": stack, "local": local, "spilled": spilled}


_VARIANTS = []  # filled by main before the worker processes fork: they take jobs by index


def _compile_job(job) -> str:
    index, arch, want_resources = job
    name, fn, types, constants, warps = _VARIANTS[index]
    kernel = compile_variant(fn, types, constants, arch, warps)
    if not want_resources:
        return ""
    r = resources(kernel)
    return (f"sm_{arch} {name} warps={warps}: {r['registers']} registers, stack {r['stack']} B, "
            f"local {r['local']} B, spilled {r['spilled']} B")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 86 89 90")
    ap.add_argument("--resources", action="store_true", help="print registers and stack / local / spilled bytes per variant")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    _VARIANTS[:] = itertools.chain(row_kernel_variants(), finish_kernel_variants())
    jobs = [(i, arch, args.resources) for arch in args.arch for i in range(len(_VARIANTS))]
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        for line in pool.map(_compile_job, jobs, chunksize=16):
            if line:
                print(line)
    print(f"compiled {len(jobs)} kernel variants for sm_{', sm_'.join(map(str, args.arch))} "
          f"with triton {triton.__version__} in {time.perf_counter() - started:.0f} s ({args.jobs} processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
