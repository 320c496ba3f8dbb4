"""Fused student-to-teacher projection + distillation loss (Triton), forward and backward.

    loss = reduce_i( w_i * d(P_i, T_i) ),   P = H W^T + b

H (N, K) hidden rows of the head, W (C, K) and b (C) its last linear layer, T (N, C) the
(normalised) teacher target, w (N) an optional row weight / mask, d one of the row distances of
``lowres_kd.losses.distance`` ("cos_smoothl1", "cos", "mse"), reduce = mean (sum_i / sum_i w_i,
an all-masked batch gives 0), sum, or none. The one plain PyTorch reference is
``lowres_kd.losses.fused_linear_distill_reference``; this module must agree with it.

Design (the fused-linear-cross-entropy idea, re-derived for a regression distance):

* The host loops over row chunks of R rows (R * C <= ``CHUNK_ELEMS`` = 2^25 elements, a power of
  two, so the chunk buffer is <= 64 MiB in bf16 / 128 MiB in fp32; smaller chunks left the
  matmuls too small to fill an H200, see benchmarks/results). For each chunk:
    1. ``P_c = H_c W^T + b`` by the vendor matmul (cuBLAS) in the input dtype, into one reused
       (R, C) buffer;
    2. the Triton kernel below, one program per block of rows, loops over C tiles twice: first
       the row statistics (p.t, |p|^2, |t|^2, sum of smoothL1 / squared error) in fp32, giving the
       per-row loss w_i d_i; then it overwrites ``P_c`` in place with w_i dd_i/dP_i (fp32 maths,
       stored in the input dtype);
    3. ``dH_c = dP_c W`` (written straight into the rows of dH), ``dW += dP_c^T H_c`` and
       ``db += sum_rows dP_c`` into fp32 accumulators.
  So the (N, C) projection and its gradient never exist in full, in fp32 or otherwise.
* The gradients are computed in forward (mean / sum) and kept; backward only multiplies them by
  grad_output (and 1 / sum_i w_i for mean), on the device, in place: no host sync anywhere. The
  reduction's 1/sum(w) is deliberately *not* folded into dP: for fp16 and large N the per-element
  gradient would underflow before the matmuls; it is applied once, in fp32, at the end.
* ``reduction="none"`` returns (N,) per-row losses, whose grad_output is a vector: dW = sum_i g_i
  dP_i^T H_i does not factor, so forward only computes the losses (no gradient matmuls) and
  backward recomputes P chunk by chunk with the row scale w_i g_i. Same memory bound, one extra
  projection matmul.

Cost. FLOPs: 6 N K C in matmuls for forward + backward (P, dH, dW: 2 N K C each), exactly those of
eager autograd, plus O(N C) elementwise work in the kernel (P and T read twice, dP written once);
"none" costs 8 N K C (P recomputed in backward). Extra memory beyond inputs: one (R, C) chunk
buffer in the input dtype, dW (C, K) and db (C) in fp32, N fp32 row losses/scales, and dH (N, K)
in the input dtype - the gradient that backward returns, held from forward to backward (it has
the size of H). The eager reference instead materialises P in fp32 (N, C), fp32 copies of H and
W, and several (N, C) fp32 temporaries saved for its backward.

Dtypes: hidden / weight / bias in fp32, bf16 or fp16 (weight and bias are cast to the hidden
dtype for the matmuls when they differ); the target in any float dtype (read and promoted to
fp32 in the kernel). All statistics and dP are computed in fp32, dW / db accumulate in fp32;
gradients come back in each input's own dtype; the loss is fp32 (as the reference's). Autocast
does not apply inside the op: it computes in the dtype it is given. No gradient flows to the
target or the row weights (passing ones that require grad is refused).

Triton notes: only basic ``tl`` APIs (load/store/sum/where/sqrt), so it runs on Triton 3.6 and
3.8; the kernel uses no ``tl.dot`` (the matmuls are cuBLAS), so the interpreter's bf16 ``tl.dot``
bug does not apply. Block sizes are fixed heuristics, no ``@triton.autotune`` (which the
interpreter refuses); on CPU tensors (``TRITON_INTERPRET=1``) big tiles are used, since the
interpreter's cost grows with the number of program instances.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..losses.distance import COS_EPS, DISTANCES
from ..losses.fused_linear_distill import check_inputs

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK_ELEMS = 1 << 25  # bound on rows_per_chunk * C: chunks big enough to keep cuBLAS busy

# distance name -> (has the cosine term, elementwise term: 0 none, 1 smoothL1, 2 squared error)
_KERNEL_DISTANCES = {"cos_smoothl1": (True, 1), "cos": (True, 0), "mse": (False, 2)}


# ---------------------------------------------------------------------------------------------
# Kernel
#
# One program owns BLOCK_M rows of the chunk; p = P_i (C), t = T_i (C), s = row scale (w_i, or
# w_i * g_i in the backward of reduction="none"). Pass 1 over C tiles accumulates in fp32
#     dot = p.t,  pp = |p|^2,  tt = |t|^2,  e = sum_c f(p_c - t_c)
# with f = smoothL1_beta (f(x) = x^2 / (2 beta) if |x| < beta else |x| - beta / 2; beta = 0 is
# |x|) or f(x) = x^2 (mse). With np = max(|p|, eps), nt = max(|t|, eps), cos = dot / (np nt):
#     d   = w_cos (1 - cos) + w_e e / C           loss_i = s d
# where (w_cos, w_e) = (alpha, 1 - alpha) for cos_smoothl1, (1, 0) for cos, (0, 1) for mse.
# Pass 2 writes, over the same tiles, in place of P:
#     dd/dp = w_cos (-t / (np nt) + [|p| > eps] cos p / np^2) + w_e f'(p - t) / C
# since d(1 - cos)/dp = -t / (np nt) + dot / (np^2 nt) * d np/dp and d np/dp = p / |p| when
# |p| > eps (0 where the clamp is active); f'(x) = x / beta if |x| < beta else sign(x) for
# smoothL1 (sign(x) for beta = 0) and 2 x for mse. The stored value is s * dd/dp.
# Masked (padding) lanes load p = t = 0 and contribute 0 to every sum.
# The mean's 1 / sum_i w_i and a scalar grad_output are applied later, by the host (backward).
# ---------------------------------------------------------------------------------------------
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
    P_ptr,  # (n_rows, n_cols) projection chunk, overwritten with s * dd/dp when WRITE_GRAD
    T_ptr,  # (n_rows, n_cols) target rows, any float dtype
    S_ptr,  # (n_rows,) fp32 row scale
    LOSS_ptr,  # (n_rows,) fp32 out: s * d
    n_rows,
    n_cols,
    stride_p,
    stride_t,
    w_cos,
    w_elem,
    beta,
    inv_beta,
    inv_cols,
    eps,
    HAS_COS: tl.constexpr,
    ELEM: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ONE_TILE: tl.constexpr,  # BLOCK_C covers the row: pass 2 reuses the loaded tile
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    p_rows = P_ptr + rows64[:, None] * stride_p
    t_rows = T_ptr + rows64[:, None] * stride_t
    col_offs = tl.arange(0, BLOCK_C)

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

    s = tl.load(S_ptr + rows, mask=row_ok, other=0.0)
    d = w_elem * esum * inv_cols
    coef_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    coef_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_COS:
        pn = tl.sqrt(pp)
        npc = tl.maximum(pn, eps)
        ntc = tl.maximum(tl.sqrt(tt), eps)
        inv_pt = 1.0 / (npc * ntc)
        cos = dot * inv_pt
        d += w_cos * (1.0 - cos)
        coef_t = -w_cos * s * inv_pt
        coef_p = tl.where(pn > eps, w_cos * s * cos / (npc * npc), 0.0)
    tl.store(LOSS_ptr + rows, s * d, mask=row_ok)

    if WRITE_GRAD:
        coef_e = w_elem * s * inv_cols
        if ONE_TILE:
            g = _tile_grad(p1, t1, coef_p, coef_t, coef_e, beta, inv_beta, HAS_COS, ELEM)
            tl.store(p_rows + col_offs[None, :], g.to(P_ptr.dtype.element_ty), mask=m)
        else:
            for c0 in range(0, n_cols, BLOCK_C):
                cols = c0 + col_offs
                m = row_ok[:, None] & (cols[None, :] < n_cols)
                p = tl.load(p_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
                t = tl.load(t_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
                g = _tile_grad(p, t, coef_p, coef_t, coef_e, beta, inv_beta, HAS_COS, ELEM)
                tl.store(p_rows + cols[None, :], g.to(P_ptr.dtype.element_ty), mask=m)


@triton.jit
def _scale_kernel(X_ptr, S_ptr, n, BLOCK: tl.constexpr):
    """x *= s in place, s a one-element fp32 device tensor (no host sync), maths in fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    s = tl.load(S_ptr)
    x = tl.load(X_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(X_ptr + offs, (x * s).to(X_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------
def _row_blocks(n_cols: int, interpreted: bool, block_c: Optional[int]):
    """(BLOCK_M, BLOCK_C, num_warps). GPU: ~4096-element tiles, a whole row when C <= 4096.
    Interpreter (CPU tensors): large tiles, few program instances."""
    if block_c is None:
        block_c = min(triton.next_power_of_2(max(n_cols, 1)), 1024 if interpreted else 4096)
    elif block_c <= 0 or block_c & (block_c - 1):
        raise ValueError(f"block_c must be a positive power of two, got {block_c}")
    if interpreted:
        return 64, block_c, 4
    block_m = max(1, 4096 // block_c)
    num_warps = 8 if block_m * block_c >= 4096 else 4
    return block_m, block_c, num_warps


def default_chunk_rows(n_rows: int, n_cols: int) -> int:
    """Rows per chunk: the largest power of two with rows * C <= CHUNK_ELEMS (at least 16)."""
    rows = max(16, CHUNK_ELEMS // max(n_cols, 1))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, n_rows))


def _launch_rows(p, t, scale, loss, *, has_cos, elem, w_cos, w_elem, beta, write_grad, block_c):
    n_rows, n_cols = p.shape
    if n_rows == 0:
        return
    block_m, block_c, num_warps = _row_blocks(n_cols, p.device.type == "cpu", block_c)
    grid = (triton.cdiv(n_rows, block_m),)
    _distill_rows_kernel[grid](
        p, t, scale, loss,
        n_rows, n_cols, p.stride(0), t.stride(0),
        float(w_cos), float(w_elem), float(beta), 1.0 / beta if beta > 0 else 0.0, 1.0 / n_cols, COS_EPS,
        HAS_COS=has_cos, ELEM=elem, WRITE_GRAD=write_grad, ONE_TILE=block_c >= n_cols,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )


def _scale_inplace(x: torch.Tensor, factor: torch.Tensor) -> None:
    """x *= factor (a 0-dim fp32 device tensor): one pass over x in its own dtype, fp32 maths.
    ``mul_`` by an fp32 tensor took ~4x the bandwidth time of dH on an H200 (profile_fused.py)."""
    n = x.numel()
    if n == 0:
        return
    block = 65536 if x.device.type == "cpu" else 4096
    _scale_kernel[(triton.cdiv(n, block),)](x, factor.reshape(1).contiguous(), n, BLOCK=block, num_warps=8 if block >= 4096 else 4)


def _chunked_pass(hidden, weight, bias, target, scale, *, dist, write_grad, need, chunk_rows, block_c):
    """One sweep over row chunks. Returns (row losses fp32 (N,), dH or None, dW fp32 or None,
    db fp32 or None); the gradients are sum_i scale_i dd_i/dP_i pulled back through the linear."""
    n, k = hidden.shape
    c = weight.shape[0]
    dev = hidden.device
    has_cos, elem, w_cos, w_elem, beta = dist
    need_dh, need_dw, need_db = need if write_grad else (False, False, False)
    loss_rows = torch.empty(n, dtype=torch.float32, device=dev)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(c, k, dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros(c, dtype=torch.float32, device=dev) if need_db else None
    rows = chunk_rows or default_chunk_rows(n, c)
    buf = torch.empty(min(rows, n), c, dtype=hidden.dtype, device=dev)
    wt = weight.t()
    for s in range(0, n, rows):
        e = min(s + rows, n)
        h = hidden[s:e]
        p = buf[: e - s]
        if bias is None:
            torch.mm(h, wt, out=p)
        else:
            torch.addmm(bias, h, wt, out=p)
        _launch_rows(
            p, target[s:e], scale[s:e], loss_rows[s:e],
            has_cos=has_cos, elem=elem, w_cos=w_cos, w_elem=w_elem, beta=beta,
            write_grad=write_grad, block_c=block_c,
        )
        if need_dh:
            torch.mm(p, weight, out=dh[s:e])
        if need_dw:
            if p.dtype == torch.float32:
                dw.addmm_(p.t(), h)
            else:
                dw.add_(torch.mm(p.t(), h))
        if need_db:
            db.add_(p.sum(0, dtype=torch.float32))
    return loss_rows, dh, dw, db


# ---------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------
class FusedLinearDistillFunction(torch.autograd.Function):
    """Forward computes the loss and (for mean / sum, when ``want_grad``) all gradients; backward
    scales them by grad_output. See the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, row_weight, alpha, beta, distance, reduction,
                want_grad, chunk_rows, block_c):
        n = hidden.shape[0]
        has_cos, elem = _KERNEL_DISTANCES[distance]
        if distance == "cos_smoothl1":
            w_cos, w_elem = alpha, 1.0 - alpha
        else:
            w_cos, w_elem = (1.0, 0.0) if has_cos else (0.0, 1.0)
        dist = (has_cos, elem, w_cos, w_elem, float(beta))
        w_c = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        b_c = bias if bias is None or bias.dtype == hidden.dtype else bias.to(hidden.dtype)
        if row_weight is None:
            scale = torch.ones(n, dtype=torch.float32, device=hidden.device)
        else:
            scale = row_weight.to(device=hidden.device, dtype=torch.float32).contiguous()
        need = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
                bias is not None and bool(ctx.needs_input_grad[2]))
        ctx.reduction = reduction
        ctx.dist = dist
        ctx.need = need
        ctx.chunk_rows, ctx.block_c = chunk_rows, block_c
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype

        if reduction == "none":
            loss_rows, _, _, _ = _chunked_pass(
                hidden, w_c, b_c, target, scale, dist=dist, write_grad=False, need=need,
                chunk_rows=chunk_rows, block_c=block_c)
            ctx.save_for_backward(hidden, w_c, b_c, target, scale)
            return loss_rows

        write_grad = bool(want_grad) and any(need)
        loss_rows, dh, dw, db = _chunked_pass(
            hidden, w_c, b_c, target, scale, dist=dist, write_grad=write_grad, need=need,
            chunk_rows=chunk_rows, block_c=block_c)
        total = loss_rows.sum()
        denom = None  # mean: a device tensor (sum of row weights) or the Python float N, never a host sync
        if reduction == "mean":
            if row_weight is not None:
                denom = scale.sum().clamp_min(torch.finfo(torch.float32).tiny)
            else:
                denom = float(max(n, 1))
            total = total / denom
        ctx.grads = (dh, dw, db) if write_grad else None
        ctx.denom = denom
        return total

    @staticmethod
    def backward(ctx, grad_out):
        need_dh, need_dw, need_db = ctx.need
        if ctx.reduction == "none":
            hidden, w_c, b_c, target, scale = ctx.saved_tensors
            row_scale = scale * grad_out.to(torch.float32)
            _, dh, dw, db = _chunked_pass(
                hidden, w_c, b_c, target, row_scale.contiguous(), dist=ctx.dist, write_grad=True,
                need=ctx.need, chunk_rows=ctx.chunk_rows, block_c=ctx.block_c)
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "fused_linear_distill: no gradients were computed in forward (it ran without "
                    "grad mode), or backward is being run a second time: the fused op scales its "
                    "saved gradients in place and frees them; rerun the forward instead of "
                    "retain_graph=True.")
            dh, dw, db = ctx.grads
            ctx.grads = None
            f = grad_out.to(torch.float32)
            if ctx.denom is not None:
                f = f / ctx.denom
            if dh is not None:
                _scale_inplace(dh, f)
            if dw is not None:
                dw.mul_(f)
            if db is not None:
                db.mul_(f)
        dw = dw.to(ctx.weight_dtype) if dw is not None else None
        db = db.to(ctx.bias_dtype) if db is not None else None
        return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None, None, None, None, None)


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
    DISTANCES.get(distance)  # unknown names raise with close matches
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
    return FusedLinearDistillFunction.apply(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        target.contiguous(), row_weight, float(alpha), float(beta), distance, reduction,
        grad_on, chunk_rows, block_c)
