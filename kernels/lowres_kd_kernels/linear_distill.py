"""Fused student-to-teacher projection + distillation loss (Triton), forward and backward.

    loss = reduce_i( w_i * d(P_i, T_i) ),   P = H W^T + b

H (N, K) hidden rows of the head, W (C, K) and b (C) its last linear layer, T (N, C) the
(normalised) teacher target, w (N) an optional row weight / mask, d one of the row distances of
``lowres_kd_kernels.distance`` ("cos_smoothl1", "cos", "mse"), reduce = mean (sum_i / sum_i w_i,
an all-masked batch gives 0), sum, or none. The one plain PyTorch reference is
``lowres_kd_kernels.reference``; this module must agree with it.

Design (the fused-linear-cross-entropy idea, re-derived for a regression distance):

* The host loops over row chunks of R rows (R * C <= ``CHUNK_ELEMS`` = 2^25 elements, a power of
  two, so a chunk is <= 64 MiB in bf16 / 128 MiB in fp32; smaller chunks left the matmuls too
  small to fill an H200, see benchmarks/results). For each chunk:
    1. ``P_c = H_c W^T + b`` by the vendor matmul (cuBLAS) in the input dtype;
    2. ``_distill_rows_kernel`` (each program loops over ``ROWS_PER_PROGRAM`` rows, in blocks)
       reads each row of P_c and T_c once into registers (twice from memory
       only when C is wider than one tile), computes the row statistics (p.t, |p|^2, |t|^2, sum of
       smoothL1 / squared error) in fp32, then overwrites ``P_c`` in place with
       norm * w_i * dd_i/dP_i (fp32 maths, stored in the input dtype). Each program also sums
       its rows' losses and the columns of dP_c (the bias gradient) in fp32 registers, and adds
       them once, at its end, to its own row of a small (programs, C + 1) fp32 table: no atomics,
       so the result is deterministic;
    3. ``dH_c = dP_c W`` (cuBLAS, straight into the rows of dH) and ``dW += dP_c^T H_c``
       (cuBLAS with an fp32 output for 16-bit inputs, ``mm(out_dtype=float32)``).
  One ``sum`` over the table's rows then gives the loss and db. So the (N, C) projection and its
  gradient never exist in full, in fp32 or otherwise.
* The gradients are computed in forward (mean / sum) and kept. The mean's normaliser (1/N, or
  1 / sum_i w_i read on the device) is folded into dP for fp32 and bf16, so dH, dW and db come
  out final for grad_output = 1. fp16 keeps dP unnormalised (1/N of a per-element gradient would
  underflow fp16 for large N) and applies it in backward. Backward is one launch of
  ``_finish_grads_kernel``: it multiplies dW and db (fp32) by grad_output and casts them to the
  parameters' dtypes, and rescales dH in place only when the factor is not exactly 1, a test the
  kernel makes on the device. ``loss.backward()`` of a bf16 / fp32 mean thus never touches dH
  again, and nothing anywhere waits for the host.
* ``reduction="none"`` returns (N,) per-row losses, whose grad_output is a vector: dW = sum_i g_i
  dP_i^T H_i does not factor, so forward only computes the losses (no gradient matmuls) and
  backward recomputes P chunk by chunk with the row scale w_i g_i. Same memory bound, one extra
  projection matmul.
* Host work is what decides the time at small N (4k rows: ~1 ms of CPU time per call against
  ~0.1 ms of GPU work, measured on an H200 with the previous, 29-op version), so the path is
  kept to 14 aten ops (autograd's own included) and two Triton launches per forward +
  backward: no per-chunk views when there is one chunk, no scale vector without row weights, no
  separate bias reduction, loss division or cast.

Cost. FLOPs: 6 N K C in matmuls for forward + backward (P, dH, dW: 2 N K C each), exactly those of
eager autograd, plus O(N C) elementwise work in the kernel (P and T read once, dP written once);
"none" costs 8 N K C (P recomputed in backward). Extra memory beyond inputs: one (R, C) chunk in
the input dtype, dW (C, K) in fp32, the (programs, C + 1) fp32 table, N fp32 row losses for
"none", and dH (N, K) in the input dtype - the gradient that backward returns, held from forward
to backward (it has the size of H). The eager reference instead materialises P in fp32 (N, C),
fp32 copies of H and W, and several (N, C) fp32 temporaries saved for its backward.

Dtypes: hidden / weight / bias in fp32, bf16 or fp16 (weight and bias are cast to the hidden
dtype for the matmuls when they differ, as an fp32 head under autocast gives); the target in any
float dtype (read and promoted to fp32 in the kernel). All statistics and dP are computed in
fp32, dW / db accumulate in fp32; gradients come back in each input's own dtype; the loss is fp32
(as the reference's). Autocast does not apply inside the op (it is switched off there): it
computes in the dtype it is given. No gradient flows to the target or the row weights (passing
ones that require grad is refused).

Triton notes: only basic ``tl`` APIs (load/store/sum/where/sqrt, loops with runtime bounds), so
it runs on Triton 3.6 and 3.8; the kernels use no ``tl.dot`` (the matmuls are cuBLAS), so the
interpreter's bf16 ``tl.dot`` bug does not apply. Block sizes are fixed heuristics, no
``@triton.autotune`` (which the interpreter refuses); on CPU tensors (``TRITON_INTERPRET=1``) big
tiles are used, since the interpreter's cost grows with the number of tiles it steps through.
On the meta device the host code runs and the launches are skipped, so the planner measures
this op's allocations by running it (a memory planner's meta pass).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .distance import COS_EPS, get_distance
from .reference import check_inputs, no_autocast

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK_ELEMS = 1 << 25  # bound on rows_per_chunk * C: chunks big enough to keep cuBLAS busy
# Row kernel tile on a GPU, in elements. Compiled for sm_90 (tests/kernels/gpu_compile.py
# --resources), 4096-element tiles at 8 warps took 128 registers a thread, leaving 2 programs
# (16 warps) an SM; 2048-element tiles take 31-80 (Triton 3.8), 3 or more programs.
GPU_TILE = 2048
# Rows each program of the row kernel loops over: enough programs to fill an H200 once (512 for a
# 16k-row chunk), while its row of the table (zeroed, added to, summed: ~16 bytes a column) stays
# under a tenth of the traffic of its 32 rows (P read and written, T read: 6 bytes a column in bf16).
ROWS_PER_PROGRAM = 32

# distance name -> (has the cosine term, elementwise term: 0 none, 1 smoothL1, 2 squared error)
_KERNEL_DISTANCES = {"cos_smoothl1": (True, 1), "cos": (True, 0), "mse": (False, 2)}


# ---------------------------------------------------------------------------------------------
# Row kernel
#
# A program owns the row blocks pid, pid + programs, ... of the chunk, BLOCK_M rows each;
# p = P_i (C), t = T_i (C), s = row scale (w_i, 1 without row weights, or w_i * g_i in the
# backward of reduction="none"). Pass 1 over C tiles accumulates in fp32
#     dot = p.t,  pp = |p|^2,  tt = |t|^2,  e = sum_c f(p_c - t_c)
# with f = smoothL1_beta (f(x) = x^2 / (2 beta) if |x| < beta else |x| - beta / 2; beta = 0 is
# |x|) or f(x) = x^2 (mse). With np = max(|p|, eps), nt = max(|t|, eps), cos = dot / (np nt):
#     d   = w_cos (1 - cos) + w_e e / C           loss_i = s d
# where (w_cos, w_e) = (alpha, 1 - alpha) for cos_smoothl1, (1, 0) for cos, (0, 1) for mse.
# Pass 2 writes, over the same tiles (from registers when one tile covers the row), in place of P:
#     dd/dp = w_cos (-t / (np nt) + [|p| > eps] cos p / np^2) + w_e f'(p - t) / C
# since d(1 - cos)/dp = -t / (np nt) + dot / (np^2 nt) * d np/dp and d np/dp = p / |p| when
# |p| > eps (0 where the clamp is active); f'(x) = x / beta if |x| < beta else sign(x) for
# smoothL1 (sign(x) for beta = 0) and 2 x for mse. The stored value is s * norm * dd/dp with
# norm the reduction's normaliser when it is folded (FOLD_NORM), else s * dd/dp.
# Masked (padding) lanes load p = t = 0 and rows past the end get s = 0: they add 0 to every sum.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _weight_sum(DEN_ptr):
    """sum_i w_i, clamped as the reference clamps it (at torch.finfo(float32).tiny)."""
    return tl.maximum(tl.load(DEN_ptr), 1.1754943508222875e-38)


@triton.jit
def _tile_stats(p, t, beta, inv_beta, HAS_COS: tl.constexpr, ELEM: tl.constexpr):
    """Per-row partial sums of one (BLOCK_M, BLOCK_C) tile: p.t, |p|^2, |t|^2, sum f(p - t)."""
    if HAS_COS:
        dot = tl.sum(p * t, axis=1)
        pp = tl.sum(p * p, axis=1)
        tt = tl.sum(t * t, axis=1)
    else:
        dot = tl.zeros([p.shape[0]], dtype=tl.float32)
        pp = tl.zeros([p.shape[0]], dtype=tl.float32)
        tt = tl.zeros([p.shape[0]], dtype=tl.float32)
    if ELEM == 1:
        a = tl.abs(p - t)
        esum = tl.sum(tl.where(a < beta, 0.5 * a * a * inv_beta, a - 0.5 * beta), axis=1)
    elif ELEM == 2:
        e = p - t
        esum = tl.sum(e * e, axis=1)
    else:
        esum = tl.zeros([p.shape[0]], dtype=tl.float32)
    return dot, pp, tt, esum


@triton.jit
def _tile_grad(p, t, coef_p, coef_t, coef_e, beta, inv_beta, HAS_COS: tl.constexpr, ELEM: tl.constexpr):
    """s * dd/dp on one tile, from the per-row coefficients."""
    g = tl.zeros(p.shape, dtype=tl.float32)
    if HAS_COS:
        g += coef_p[:, None] * p + coef_t[:, None] * t
    if ELEM == 1:
        e = p - t
        sgn = tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0))
        g += coef_e[:, None] * tl.where(tl.abs(e) < beta, e * inv_beta, sgn)
    if ELEM == 2:
        g += (2.0 * coef_e)[:, None] * (p - t)
    return g


@triton.jit
def _distill_rows_kernel(
    P_ptr,  # (n_rows, n_cols) projection chunk, overwritten with the scaled dd/dp when WRITE_GRAD
    T_ptr,  # (n_rows, n_cols) target rows, any float dtype
    S_ptr,  # (n_rows,) fp32 row scale (read when HAS_ROW_SCALE)
    DEN_ptr,  # () fp32 sum of the row weights: the weighted mean's denominator (read when HAS_DEN)
    LOSS_ptr,  # (n_rows,) fp32 out: per-row s * d (when ROW_LOSSES)
    PART_ptr,  # (programs, n_cols + 1) fp32 in/out: += column sums of dP, and in the last column
    #            the normalised loss sum (when not ROW_LOSSES)
    n_rows,
    n_cols,
    stride_p,
    stride_t,
    stride_part,
    w_cos,
    w_elem,
    beta,
    inv_beta,
    inv_cols,
    eps,
    norm,  # 1/N for an unweighted mean, else 1
    HAS_COS: tl.constexpr,
    ELEM: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_DEN: tl.constexpr,
    FOLD_NORM: tl.constexpr,  # dP carries the normaliser (fp32 / bf16) or not (fp16)
    WRITE_GRAD: tl.constexpr,
    ROW_LOSSES: tl.constexpr,
    COL_SUMS: tl.constexpr,
    ONE_TILE: tl.constexpr,  # BLOCK_C covers the row: pass 2 reuses the loaded tile
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    inv = norm
    if HAS_DEN:
        inv = inv / _weight_sum(DEN_ptr)
    col_offs = tl.arange(0, BLOCK_C)
    loss_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    col_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    part_row = PART_ptr + pid * stride_part

    for block in range(pid, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        p_rows = P_ptr + rows64[:, None] * stride_p
        t_rows = T_ptr + rows64[:, None] * stride_t

        if ONE_TILE:
            m = row_ok[:, None] & (col_offs[None, :] < n_cols)
            p1 = tl.load(p_rows + col_offs[None, :], mask=m, other=0.0).to(tl.float32)
            t1 = tl.load(t_rows + col_offs[None, :], mask=m, other=0.0).to(tl.float32)
            dot, pp, tt, esum = _tile_stats(p1, t1, beta, inv_beta, HAS_COS, ELEM)
        else:
            dot = tl.zeros([BLOCK_M], dtype=tl.float32)
            pp = tl.zeros([BLOCK_M], dtype=tl.float32)
            tt = tl.zeros([BLOCK_M], dtype=tl.float32)
            esum = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c0 in range(0, n_cols, BLOCK_C):
                cols = c0 + col_offs
                m = row_ok[:, None] & (cols[None, :] < n_cols)
                p = tl.load(p_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
                t = tl.load(t_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
                d_dot, d_pp, d_tt, d_e = _tile_stats(p, t, beta, inv_beta, HAS_COS, ELEM)
                dot += d_dot
                pp += d_pp
                tt += d_tt
                esum += d_e

        if HAS_ROW_SCALE:
            s = tl.load(S_ptr + rows, mask=row_ok, other=0.0)
        else:
            s = tl.where(row_ok, 1.0, 0.0)
        d = w_elem * esum * inv_cols
        coef_p = tl.zeros([BLOCK_M], dtype=tl.float32)
        coef_t = tl.zeros([BLOCK_M], dtype=tl.float32)
        sg = s  # the scale of the stored gradient
        if FOLD_NORM:
            sg = s * inv
        if HAS_COS:
            pn = tl.sqrt(pp)
            npc = tl.maximum(pn, eps)
            ntc = tl.maximum(tl.sqrt(tt), eps)
            inv_pt = 1.0 / (npc * ntc)
            cos = dot * inv_pt
            d += w_cos * (1.0 - cos)
            coef_t = -w_cos * sg * inv_pt
            coef_p = tl.where(pn > eps, w_cos * sg * cos / (npc * npc), 0.0)
        if ROW_LOSSES:
            tl.store(LOSS_ptr + rows, s * d, mask=row_ok)
        else:
            loss_acc += s * d

        if WRITE_GRAD:
            coef_e = w_elem * sg * inv_cols
            if ONE_TILE:
                g = _tile_grad(p1, t1, coef_p, coef_t, coef_e, beta, inv_beta, HAS_COS, ELEM)
                tl.store(p_rows + col_offs[None, :], g.to(P_ptr.dtype.element_ty), mask=m)
                if COL_SUMS:
                    col_acc += tl.sum(g, axis=0)
            else:
                for c0 in range(0, n_cols, BLOCK_C):
                    cols = c0 + col_offs
                    m = row_ok[:, None] & (cols[None, :] < n_cols)
                    p = tl.load(p_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
                    t = tl.load(t_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
                    g = _tile_grad(p, t, coef_p, coef_t, coef_e, beta, inv_beta, HAS_COS, ELEM)
                    tl.store(p_rows + cols[None, :], g.to(P_ptr.dtype.element_ty), mask=m)
                    if COL_SUMS:  # wider than a tile: this program's row of the table, tile by tile
                        cm = cols < n_cols
                        tl.store(part_row + cols, tl.load(part_row + cols, mask=cm) + tl.sum(g, axis=0), mask=cm)

    if COL_SUMS and ONE_TILE:
        cm = col_offs < n_cols
        tl.store(part_row + col_offs, tl.load(part_row + col_offs, mask=cm) + col_acc, mask=cm)
    if not ROW_LOSSES:
        tl.store(part_row + n_cols, tl.load(part_row + n_cols) + tl.sum(loss_acc, axis=0) * inv)


# ---------------------------------------------------------------------------------------------
# Backward kernel: one launch for the three gradients kept from forward, with
#     f = factor * grad_output (if HAS_G) / max(sum_i w_i, tiny) (if HAS_DEN)
# dH *= f in place, skipped on the device when f == 1; dW_out = f dW and db_out = f db, cast to
# the parameters' dtypes (in place when those are fp32). Programs [0, blocks_dh) do dH, the
# next blocks_dw do dW, the rest db (block counts from the host: n + BLOCK - 1 could wrap int32).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _scaled_block(SRC_ptr, DST_ptr, block, n, f, BLOCK: tl.constexpr):
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(SRC_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(DST_ptr + offs, (x * f).to(DST_ptr.dtype.element_ty), mask=m)


@triton.jit
def _finish_grads_kernel(
    G_ptr, DEN_ptr,
    DH_ptr, n_dh, blocks_dh,
    DW_ptr, DW_OUT_ptr, n_dw, blocks_dw,
    DB_ptr, DB_OUT_ptr, n_db,
    factor,
    HAS_G: tl.constexpr,
    HAS_DEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    f = factor
    if HAS_G:
        f = f * tl.load(G_ptr).to(tl.float32)
    if HAS_DEN:
        f = f / _weight_sum(DEN_ptr)
    pid = tl.program_id(0)
    if pid < blocks_dh:
        if f != 1.0:
            _scaled_block(DH_ptr, DH_ptr, pid, n_dh, f, BLOCK)
    elif pid < blocks_dh + blocks_dw:
        _scaled_block(DW_ptr, DW_OUT_ptr, pid - blocks_dh, n_dw, f, BLOCK)
    else:
        _scaled_block(DB_ptr, DB_OUT_ptr, pid - blocks_dh - blocks_dw, n_db, f, BLOCK)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: ``triton.cdiv`` is a constexpr-function wrapper that costs about 1.5 us
    a call on the host, and host work is what bounds a call at small N."""
    return -(-a // b)


class _Distance(NamedTuple):
    has_cos: bool
    elem: int
    w_cos: float
    w_elem: float
    beta: float


class _Tiling(NamedTuple):
    block_m: int
    block_c: int
    num_warps: int
    programs: int  # the most programs a launch of the row kernel uses (rows of the table)


@functools.lru_cache(maxsize=64)
def _distance(distance: str, alpha: float, beta: float) -> _Distance:
    has_cos, elem = _KERNEL_DISTANCES[distance]
    if distance == "cos_smoothl1":
        w_cos, w_elem = alpha, 1.0 - alpha
    else:
        w_cos, w_elem = (1.0, 0.0) if has_cos else (0.0, 1.0)
    return _Distance(has_cos, elem, float(w_cos), float(w_elem), float(beta))


@functools.lru_cache(maxsize=256)  # a few shapes per run: computed once each, not per call
def _tiling(chunk_rows: int, n_cols: int, device_type: str, block_c: Optional[int], *,
            tile: Optional[int] = None, rows_per_program: int = ROWS_PER_PROGRAM) -> _Tiling:
    """GPU and meta (which stands for the GPU the planner plans for): a tile is a whole row, up to
    4096 columns (block_c, the next power of two), times block_m = GPU_TILE // block_c rows when
    that is more than one. Interpreter (CPU tensors): 16 rows of up to 1024 columns, since its cost
    grows with the number of tiles it steps through. Every program takes about ``rows_per_program``
    rows, in blocks of block_m. benchmarks/tune_rows.py alone overrides ``tile`` (elements, on any
    device; a tile narrower than the row splits it) and ``rows_per_program``."""
    on_gpu = device_type in ("cuda", "meta")
    if block_c is None:
        block_c = min(1 << (max(n_cols, 1) - 1).bit_length(), 4096 if on_gpu else 1024)  # next power of two
        if tile is not None:
            block_c = min(block_c, tile)
    for name, value in (("tile", tile), ("block_c", block_c)):
        if value is not None and (value <= 0 or value & (value - 1)):
            raise ValueError(f"{name} must be a positive power of two, got {value}")
    if rows_per_program < 1:
        raise ValueError(f"rows_per_program must be >= 1, got {rows_per_program}")
    if on_gpu or tile is not None:  # 8 fp32 values of P and of T a thread (GPU_TILE)
        block_m = max(1, (tile or GPU_TILE) // block_c)
        num_warps = max(4, min(16, block_m * block_c // 256))
    else:
        block_m, num_warps = 16, 4
    programs = _cdiv(_cdiv(chunk_rows, block_m), _cdiv(rows_per_program, block_m))
    return _Tiling(block_m, block_c, num_warps, max(1, programs))


def folds_norm(dtype: torch.dtype) -> bool:
    """Whether the mean's normaliser is folded into dP for this input dtype: not for fp16, where 1/N
    of a per-element gradient would underflow for large N (see the module docstring)."""
    return dtype != torch.float16


def default_chunk_rows(n_rows: int, n_cols: int) -> int:
    """Rows per chunk: the largest power of two with rows * C <= CHUNK_ELEMS (at least 16)."""
    rows = max(16, CHUNK_ELEMS // max(n_cols, 1))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, n_rows))


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_ok(device_type: str) -> bool:
    """Whether 16-bit matrices multiply into an fp32 result on this device type: ``mm(out_dtype=)``
    (torch >= 2.8) has CUDA and meta kernels, where the planner runs this op. Allocates nothing."""
    return device_type in ("cuda", "meta") and "dtype" in torch.ops.aten.mm.overloads()


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as an fp32 tensor, accumulated in fp32 and never rounded to a 16-bit dtype."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if _mm_out_dtype_ok(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())  # CPU (the interpreter's tests): the same sums, upcast first


def _chunked_pass(hidden, weight, bias, target, row_scale, den, dist: _Distance, *, norm, fold, write_grad,
                  need, row_losses, chunk_rows, block_c):
    """One sweep over row chunks. Returns (loss, dH or None, dW fp32 or None, db fp32 or None):
    loss is the (N,) fp32 row losses when ``row_losses``, else the normalised scalar sum; the
    gradients are sum_i row_scale_i dd_i/dP_i (times ``norm`` / den when ``fold``) pulled back
    through the linear layer."""
    n, c = hidden.shape[0], weight.shape[0]
    rows = chunk_rows or default_chunk_rows(n, c)
    tiling = _tiling(min(rows, n), c, hidden.device.type, block_c)
    need_dh, need_dw, need_db = need if write_grad else (False, False, False)
    loss_rows = torch.empty(n, dtype=torch.float32, device=hidden.device) if row_losses else None
    table = None if row_losses else torch.zeros(tiling.programs, c + 1, dtype=torch.float32, device=hidden.device)
    one_chunk = rows >= n
    dh = torch.empty_like(hidden) if need_dh and not one_chunk else None  # several chunks: one dH, filled by rows
    dw = None
    for s in range(0, n, rows):
        e = min(s + rows, n)
        if one_chunk:  # no views (each is host work, see the docstring)
            h, t, rs, lr = hidden, target, row_scale, loss_rows
        else:
            h, t, rs, lr = (None if x is None else x[s:e] for x in (hidden, target, row_scale, loss_rows))
        p = F.linear(h, weight, bias)
        _launch_rows(p, t, rs, den, lr, table, dist, tiling, norm=norm, fold=fold, write_grad=write_grad,
                     col_sums=need_db)
        if need_dh:
            if one_chunk:
                dh = torch.mm(p, weight)
            else:
                torch.mm(p, weight, out=dh[s:e])
        if need_dw:
            dw_c = _mm_fp32(p.t(), h)
            dw = dw_c if dw is None else dw.add_(dw_c)
        del p  # the next chunk's P reuses this block of the caching allocator
    if n == 0:  # no rows: zero gradients, as the reference's autograd gives
        dh = torch.zeros_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if need_dw else None
    if row_losses:
        return loss_rows, dh, dw, None
    sums = table.sum(0)
    # the loss is a copy, not a view of sums: a custom Function's output may then be changed in place
    return sums[c].clone(), dh, dw, (sums[:c] if need_db else None)


def _row_constexprs(dist: _Distance, tiling: _Tiling, n_cols: int, *, row_scale, den, loss_rows, fold, write_grad,
                    col_sums) -> dict:
    """The row kernel's compile-time arguments for one launch (``num_warps`` included): what makes
    it a distinct compiled variant. tests/kernels/gpu_compile.py compiles exactly these. The
    normaliser's folding only matters where the gradient is written: one variant, not two, else."""
    return dict(HAS_COS=dist.has_cos, ELEM=dist.elem, HAS_ROW_SCALE=row_scale is not None, HAS_DEN=den is not None,
                FOLD_NORM=fold and write_grad, WRITE_GRAD=write_grad, ROW_LOSSES=loss_rows is not None,
                COL_SUMS=col_sums, ONE_TILE=tiling.block_c >= n_cols, BLOCK_M=tiling.block_m,
                BLOCK_C=tiling.block_c, num_warps=tiling.num_warps)


def _launch_rows(p, t, row_scale, den, loss_rows, table, dist: _Distance, tiling: _Tiling, *, norm, fold,
                 write_grad, col_sums):
    n_rows, n_cols = p.shape
    # before the meta return: tests/kernels/gpu_compile.py records these from runs on meta
    constexprs = _row_constexprs(dist, tiling, n_cols, row_scale=row_scale, den=den, loss_rows=loss_rows, fold=fold,
                                 write_grad=write_grad, col_sums=col_sums)
    if n_rows == 0 or p.device.type == "meta":  # meta: the planner measures allocations only
        return
    dummy = p  # never read: pointer arguments that a constexpr flag switches off
    grid = (min(_cdiv(n_rows, tiling.block_m), tiling.programs),)
    _distill_rows_kernel[grid](
        p, t, dummy if row_scale is None else row_scale, dummy if den is None else den,
        dummy if loss_rows is None else loss_rows, dummy if table is None else table,
        n_rows, n_cols, p.stride(0), t.stride(0), 0 if table is None else table.stride(0),
        dist.w_cos, dist.w_elem, dist.beta, 1.0 / dist.beta if dist.beta > 0 else 0.0, 1.0 / n_cols, COS_EPS,
        float(norm), **constexprs,
    )


def _out_in(x: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Where the final fp32 gradient x goes: x itself for an fp32 parameter, else a new tensor."""
    return x if x is None or dtype == torch.float32 else torch.empty_like(x, dtype=dtype)


def _finish_grads(dh, dw, db, *, grad_out, den, factor, weight_dtype, bias_dtype):
    """Final (dH, dW, db) from the kept ones: see ``_finish_grads_kernel``. dH is scaled in place;
    dW and db come back in the parameters' dtypes. No launch when nothing is scaled or cast."""
    dw_out, db_out = _out_in(dw, weight_dtype), _out_in(db, bias_dtype)
    scaled = grad_out is not None or den is not None or factor != 1.0
    n_dh = dh.numel() if dh is not None and scaled else 0
    n_dw = dw.numel() if dw is not None and (scaled or dw_out is not dw) else 0
    n_db = db.numel() if db is not None and (scaled or db_out is not db) else 0
    present = next((x for x in (dh, dw, db) if x is not None), None)
    if present is None or n_dh + n_dw + n_db == 0 or present.device.type == "meta":
        return dh, dw_out, db_out
    block = 4096 if present.is_cuda else 65536
    blocks = [_cdiv(x, block) for x in (n_dh, n_dw, n_db)]

    def ptr(x):  # absent tensors: any pointer, never read (their count is 0, or their flag off)
        return present if x is None else x

    _finish_grads_kernel[(sum(blocks),)](
        ptr(grad_out), ptr(den),
        ptr(dh), n_dh, blocks[0],
        ptr(dw), ptr(dw_out), n_dw, blocks[1],
        ptr(db), ptr(db_out), n_db,
        float(factor), HAS_G=grad_out is not None, HAS_DEN=den is not None, BLOCK=block,
        num_warps=8 if present.is_cuda else 4,
    )
    return dh, dw_out, db_out


# ---------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------
class FusedLinearDistillFunction(torch.autograd.Function):
    """Forward computes the loss and (for mean / sum, when ``want_grad``) all gradients; backward
    finishes them with grad_output. See the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, row_weight, dist, reduction, want_grad, chunk_rows, block_c):
        n = hidden.shape[0]
        w_c = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        b_c = bias if bias is None or bias.dtype == hidden.dtype else bias.to(hidden.dtype)
        scale = None if row_weight is None else row_weight.to(device=hidden.device, dtype=torch.float32).contiguous()
        need = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
                bias is not None and bool(ctx.needs_input_grad[2]))
        ctx.reduction, ctx.dist, ctx.need = reduction, dist, need
        ctx.tiles = dict(chunk_rows=chunk_rows, block_c=block_c)
        ctx.dtypes = dict(weight_dtype=weight.dtype, bias_dtype=None if bias is None else bias.dtype)

        if reduction == "none":
            loss_rows, _, _, _ = _chunked_pass(hidden, w_c, b_c, target, scale, None, dist, norm=1.0, fold=False,
                                               write_grad=False, need=need, row_losses=True, **ctx.tiles)
            ctx.save_for_backward(hidden, w_c, b_c, target, scale)
            return loss_rows

        weighted_mean = reduction == "mean" and scale is not None
        den = scale.sum() if weighted_mean else None  # on the device: no host sync
        norm = 1.0 / max(n, 1) if reduction == "mean" and scale is None else 1.0
        fold = folds_norm(hidden.dtype)
        write_grad = bool(want_grad) and any(need)
        loss, dh, dw, db = _chunked_pass(hidden, w_c, b_c, target, scale, den, dist, norm=norm, fold=fold,
                                         write_grad=write_grad, need=need, row_losses=False, **ctx.tiles)
        ctx.grads = (dh, dw, db) if write_grad else None
        ctx.den, ctx.factor = (None, 1.0) if fold else (den, norm)  # what backward still has to apply
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, w_c, b_c, target, scale = ctx.saved_tensors
            g = grad_out.to(torch.float32)
            row_scale = (g if scale is None else scale * g).contiguous()
            with no_autocast(hidden.device):
                _, dh, dw, db = _chunked_pass(hidden, w_c, b_c, target, row_scale, None, ctx.dist, norm=1.0,
                                              fold=False, write_grad=True, need=ctx.need, row_losses=False, **ctx.tiles)
            dh, dw, db = _finish_grads(dh, dw, db, grad_out=None, den=None, factor=1.0, **ctx.dtypes)
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "fused_linear_distill: no gradients were computed in forward (it ran without "
                    "grad mode), or backward is being run a second time: the fused op scales its "
                    "saved gradients in place and frees them; rerun the forward instead of "
                    "retain_graph=True.")
            dh, dw, db = ctx.grads
            ctx.grads = None
            dh, dw, db = _finish_grads(dh, dw, db, grad_out=grad_out, den=ctx.den, factor=ctx.factor, **ctx.dtypes)
        need_dh, need_dw, need_db = ctx.need
        return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None, None, None)


def fused_linear_distill_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    row_weight: Optional[torch.Tensor] = None,
    alpha: float = 0.5,
    beta: float = 1.0,
    distance: str = "cos_smoothl1",
    reduction: str = "mean",
    *,
    chunk_rows: Optional[int] = None,
    block_c: Optional[int] = None,
) -> torch.Tensor:
    """The fused op; same arguments and result as ``fused_linear_distill_reference``.

    ``chunk_rows`` (rows per chunk, default ``default_chunk_rows``) and ``block_c`` (C tile, a
    power of two) override the heuristics; tests use them to run several chunks and tiles.
    """
    check_inputs(hidden, weight, bias, target, row_weight, reduction)
    get_distance(distance)  # unknown names raise with close matches
    if distance not in _KERNEL_DISTANCES:
        raise NotImplementedError(
            f"distance {distance!r} has no fused kernel (kernels: {sorted(_KERNEL_DISTANCES)}); use backend='torch'")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not supported by the Triton kernel ({SUPPORTED_DTYPES}); use backend='torch'")
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating tensor, got {target.dtype}")
    devices = {t.device for t in (hidden, weight, bias, target, row_weight) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    grad_on = torch.is_grad_enabled()
    for name, t in (("target", target), ("row_weight", row_weight)):
        if grad_on and t is not None and t.requires_grad:
            raise ValueError(f"the fused op gives no gradient to {name}; pass {name}.detach()")
    with no_autocast(hidden.device):
        return FusedLinearDistillFunction.apply(
            hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            target.contiguous(), row_weight, _distance(distance, alpha, beta), reduction, grad_on, chunk_rows, block_c)
