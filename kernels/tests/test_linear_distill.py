"""Fused linear + distillation kernel against the float64 reference (lowres_kd_kernels.reference).

On CPU the Triton kernels run in the interpreter (conftest.py sets TRITON_INTERPRET=1);
the ``cuda`` variants (marker ``gpu``) run the compiled kernels. Errors are measured relative to
the largest entry of the reference (gradients of a mean loss are ~1/N in absolute size).
"""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lowres_kd_kernels as kernels
from lowres_kd_kernels import DISTANCES, REDUCTIONS, FusedLinearDistill, fused_linear_distill, fused_linear_distill_reference, triton_usable

# (dtype, atol, rtol), both relative to max |reference|. Inputs are rounded to the dtype before
# the float64 reference sees them, so these bound the op's own rounding: P and dP stored in the
# input dtype (8 mantissa bits for bf16, 11 for fp16), matmul outputs in the input dtype.
DTYPE_TOL = [
    (torch.float32, 2e-5, 1e-4),
    (torch.bfloat16, 3e-2, 3e-2),
    (torch.float16, 4e-3, 4e-3),
]
SMALL = (37, 45, 67)  # N, K, C: no multiple of any block size
ODD = (203, 97, 1031)  # C > 1024: two C tiles even with the interpreter's default tile


def _devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=_devices())
def device(request):
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter is off (a CUDA machine): the cuda variant covers this")
    return request.param


def _op():
    from lowres_kd_kernels.linear_distill import fused_linear_distill_triton

    return fused_linear_distill_triton


def _inputs(n, k, c, device, bias=True, mask="some"):
    """fp32 master inputs: targets with per-row scales over 3 decades, one zero target row."""
    h = torch.randn(n, k, device=device)
    w = torch.randn(c, k, device=device) / k**0.5
    b = 0.5 * torch.randn(c, device=device) if bias else None
    t = torch.randn(n, c, device=device) * torch.logspace(-1.5, 1.5, n, device=device)[torch.randperm(n, device=device)][:, None]
    t[n // 2] = 0.0
    if mask == "none":
        rw = None
    elif mask == "some":
        rw = (torch.rand(n, device=device) > 0.3).float() * torch.rand(n, device=device).add(0.5)
        rw[:3] = 0.0  # zero rows
    else:  # "all"
        rw = torch.zeros(n, device=device)
    return h, w, b, t, rw


def _rel_close(actual, expected, atol, rtol, what):
    scale = expected.detach().abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual.detach().double() / scale, expected.detach() / scale, atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def _run_both(h, w, b, t, rw, dtype, grad_scale=2.5, **kw):
    """Returns (loss, grads) of the op on dtype inputs and of the float64 reference on the same
    rounded values, with backward at grad_output = grad_scale (random per row for 'none')."""
    extra = {k: kw.pop(k) for k in ("chunk_rows", "block_c") if k in kw}
    leaves = [x.to(dtype).requires_grad_() if x is not None else None for x in (h, w, b)]
    loss = _op()(*leaves, t, rw, **kw, **extra)
    g = (torch.randn(loss.shape, device=loss.device) if loss.dim() else torch.tensor(grad_scale, device=loss.device))
    loss.backward(g)
    ref_leaves = [x.detach().double().requires_grad_() if x is not None else None for x in leaves]
    ref = fused_linear_distill_reference(*ref_leaves, t.double(), None if rw is None else rw.double(), **kw)
    ref.backward(g.double())
    got = [x.grad for x in leaves if x is not None]
    want = [x.grad for x in ref_leaves if x is not None]
    for x, gx in zip([x for x in leaves if x is not None], got):
        assert gx.dtype == x.dtype
    return loss, ref, got, want


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("distance", sorted(DISTANCES))
def test_matches_reference_fp32_chunked(device, distance, reduction, bias):
    """Every distance x reduction x bias; 3 row chunks and 3 C tiles per row (forced)."""
    h, w, b, t, rw = _inputs(*SMALL, device, bias=bias)
    loss, ref, got, want = _run_both(h, w, b, t, rw, torch.float32, distance=distance, reduction=reduction,
                                     alpha=0.3, beta=0.7, chunk_rows=16, block_c=32)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    _rel_close(loss, ref, 2e-6, 1e-5, "loss")
    for name, a, e in zip(("dH", "dW", "db"), got, want):
        _rel_close(a, e, 2e-5, 1e-4, name)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOL, ids=lambda x: str(x).replace("torch.", "") if isinstance(x, torch.dtype) else None)
@pytest.mark.parametrize("distance", sorted(DISTANCES))
def test_dtypes_odd_shape(device, distance, dtype, atol, rtol):
    """Larger odd shape, default chunking and tiles, each dtype with its tolerance."""
    h, w, b, t, rw = _inputs(*ODD, device)
    t = t.to(dtype)  # the target may come in the low-precision dtype of a feature cache
    loss, ref, got, want = _run_both(h, w, b, t, rw, dtype, distance=distance, reduction="mean")
    _rel_close(loss, ref, atol / 10, rtol / 10, "loss")
    for name, a, e in zip(("dH", "dW", "db"), got, want):
        _rel_close(a, e, atol, rtol, name)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOL[1:], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_dtypes_reductions_chunked(device, reduction, dtype, atol, rtol):
    h, w, b, t, rw = _inputs(*SMALL, device)
    loss, ref, got, want = _run_both(h, w, b, t, rw, dtype, reduction=reduction, chunk_rows=8, block_c=64)
    _rel_close(loss, ref, atol / 10, rtol / 10, "loss")
    for name, a, e in zip(("dH", "dW", "db"), got, want):
        _rel_close(a, e, atol, rtol, name)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOL, ids=lambda x: str(x).replace("torch.", "") if isinstance(x, torch.dtype) else None)
@pytest.mark.parametrize("grad_scale", [1.0, -0.75])
def test_unweighted_mean_folds_the_normaliser(device, dtype, atol, rtol, grad_scale):
    """Mean without row weights: fp32 / bf16 fold 1/N into dP (grad_output 1 leaves dH as
    computed in forward, other values rescale it), fp16 applies 1/N in backward instead."""
    h, w, b, t, rw = _inputs(*ODD, device, mask="none")
    loss, ref, got, want = _run_both(h, w, b, t, rw, dtype, grad_scale=grad_scale, chunk_rows=64)
    _rel_close(loss, ref, atol / 10, rtol / 10, "loss")
    for name, a, e in zip(("dH", "dW", "db"), got, want):
        _rel_close(a, e, atol, rtol, name)


@pytest.mark.parametrize("beta,alpha", [(0.0, 0.5), (3.0, 0.9), (1.0, 0.0), (1.0, 1.0)])
def test_beta_alpha_edges(device, beta, alpha):
    """beta = 0 is plain L1; alpha = 0 / 1 drop one term."""
    h, w, b, t, rw = _inputs(*SMALL, device, mask="none")
    loss, ref, got, want = _run_both(h, w, b, t, rw, torch.float32, alpha=alpha, beta=beta)
    _rel_close(loss, ref, 2e-6, 1e-5, "loss")
    for name, a, e in zip(("dH", "dW", "db"), got, want):
        _rel_close(a, e, 2e-5, 1e-4, name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fully_masked_batch_is_zero(device, reduction):
    h, w, b, t, rw = _inputs(*SMALL, device, mask="all")
    leaves = [x.requires_grad_() for x in (h, w, b)]
    loss = _op()(*leaves, t, rw, reduction=reduction, chunk_rows=16)
    loss.backward(torch.ones_like(loss))
    assert torch.all(loss == 0)
    for x in leaves:
        assert torch.isfinite(x.grad).all() and torch.all(x.grad == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_rows(device, reduction):
    """An empty batch: the reference's loss (0, or no rows) and zero gradients, not None."""
    h, w, b, t = (torch.randn(*shape, device=device) for shape in ((0, 8), (5, 8), (5,), (0, 5)))
    leaves = [x.requires_grad_() for x in (h, w, b)]
    loss = _op()(*leaves, t, reduction=reduction)
    loss.sum().backward()
    assert torch.equal(loss, fused_linear_distill_reference(h, w, b, t, reduction=reduction).detach())
    for x in leaves:
        assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()


def test_mixed_dtypes_return_each_inputs_dtype(device):
    """bf16 activations with an fp32 head (what autocast training gives): dW, db come back fp32."""
    h, w, b, t, rw = _inputs(*SMALL, device)
    hb = h.bfloat16().requires_grad_()
    w32, b32 = w.clone().requires_grad_(), b.clone().requires_grad_()
    _op()(hb, w32, b32, t, rw).backward()
    assert hb.grad.dtype == torch.bfloat16 and w32.grad.dtype == torch.float32 and b32.grad.dtype == torch.float32
    ref_leaves = [hb.detach().double().requires_grad_(), w32.detach().bfloat16().double().requires_grad_(),
                  b32.detach().bfloat16().double().requires_grad_()]
    fused_linear_distill_reference(*ref_leaves, t.double(), rw.double()).backward()
    for name, a, e in zip(("dH", "dW", "db"), (hb.grad, w32.grad, b32.grad), [x.grad for x in ref_leaves]):
        _rel_close(a, e, 3e-2, 3e-2, name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_does_not_apply_inside(device, reduction):
    """fp32 inputs under bf16 autocast, several chunks: still the fp32 result (the op computes in
    the dtypes it is given; autocast would have recast its matmuls)."""
    h, w, b, t, rw = _inputs(*SMALL, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, ref, got, want = _run_both(h, w, b, t, rw, torch.float32, reduction=reduction, chunk_rows=16)
    _rel_close(loss, ref, 2e-6, 1e-5, "loss")
    for name, a, e in zip(("dH", "dW", "db"), got, want):
        assert a.dtype == torch.float32
        _rel_close(a, e, 2e-5, 1e-4, name)


def test_loss_can_be_changed_in_place(device):
    h, w, b, t, rw = _inputs(*SMALL, device)
    loss = _op()(h.requires_grad_(), w, b, t, rw)
    loss.mul_(2.0).backward()
    h2 = h.detach().double().requires_grad_()
    (2 * fused_linear_distill_reference(h2, w.double(), b.double(), t.double(), rw.double())).backward()
    _rel_close(h.grad, h2.grad, 2e-5, 1e-4, "dH")


def test_no_grad_forward_and_frozen_head(device):
    h, w, b, t, rw = _inputs(*SMALL, device)
    ref = fused_linear_distill_reference(h, w, b, t, rw)
    with torch.no_grad():
        _rel_close(_op()(h.requires_grad_(), w, b, t, rw), ref.double(), 1e-6, 1e-5, "no_grad loss")
    h.grad = None
    loss = _op()(h, w, b, t, rw)  # frozen head: only dH
    loss.backward()
    h2 = h.detach().double().requires_grad_()
    fused_linear_distill_reference(h2, w.double(), b.double(), t.double(), rw.double()).backward()
    _rel_close(h.grad, h2.grad, 2e-5, 1e-4, "dH")


def test_refuses_grad_to_target_and_second_backward(device):
    h, w, b, t, rw = _inputs(*SMALL, device)
    with pytest.raises(ValueError, match="target.detach"):
        _op()(h, w, b, t.requires_grad_(), rw)
    loss = _op()(h.requires_grad_(), w, b, t.detach(), rw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_argument_errors(device):
    h, w, b, t, rw = _inputs(*SMALL, device)
    with pytest.raises(ValueError, match="reduction"):
        _op()(h, w, b, t, reduction="max")
    with pytest.raises(KeyError, match="cos_smoothl1"):
        _op()(h, w, b, t, distance="cos_smoothl")
    with pytest.raises(ValueError, match="target must be"):
        _op()(h, w, b, t[:, :-1])
    with pytest.raises(TypeError, match="backend='torch'"):
        _op()(h.double(), w.double(), b.double(), t)


def test_default_chunk_rows_bounds_the_chunk():
    from lowres_kd_kernels.linear_distill import CHUNK_ELEMS, default_chunk_rows

    for n, c in [(65536, 768), (65536, 1280), (100, 1024), (5, 7)]:
        rows = default_chunk_rows(n, c)
        assert 1 <= rows <= n and rows * c <= max(CHUNK_ELEMS, 16 * c)
        assert rows == n or rows & (rows - 1) == 0


class _NewTensors(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns that is not a view of a given input."""

    def __init__(self, inputs):
        super().__init__()
        self.input_storages = {x.untyped_storage().data_ptr() for x in inputs}
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in self.input_storages:
                self.shapes.append(tuple(o.shape))
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_projection_never_materialised(device, reduction):
    """No op of forward + backward returns a new (rows, C) tensor with more rows than a chunk."""
    n, k, c, chunk = 256, 40, 67, 32
    h, w, b, t, rw = _inputs(n, k, c, device)
    leaves = [x.requires_grad_() for x in (h, w, b)]

    def run(fn, **kw):
        rec = _NewTensors([*leaves, t, rw])
        with rec:
            loss = fn(*leaves, t, rw, reduction=reduction, **kw)
            loss.backward(torch.ones_like(loss))
        return [s for s in rec.shapes if len(s) == 2 and s[1] == c]

    assert (n, c) in run(fused_linear_distill_reference)  # the recorder sees the reference's P
    big = [s for s in run(_op(), chunk_rows=chunk) if s[0] > chunk]
    assert not big, f"(rows, C) tensors larger than a chunk: {big}"


class _HostOps(TorchDispatchMode):
    """Counts the aten ops a call dispatches and its Triton launches (the interpreter's own ops,
    recognised by their frames, mark a launch and are not counted as ops)."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches, self._in_launch = [], 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame, interpreted = sys._getframe(1), False
        while frame is not None and not interpreted:
            interpreted = "triton" in frame.f_code.co_filename
            frame = frame.f_back
        if interpreted and not self._in_launch:
            self.launches += 1
        self._in_launch = interpreted
        if not interpreted:
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("row_weight", [False, True], ids=["rows", "weighted"])
def test_host_work_per_call_is_bounded(row_weight):
    """At 4k rows an H200 call is bound by host work (benchmarks/results): one chunk of a mean
    loss takes two Triton launches and a fixed handful of aten ops (autograd's own included)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts the interpreter's launches")
    h, w, b, t, rw = _inputs(*ODD, "cpu")
    leaves = [x.requires_grad_() for x in (h, w, b)]
    rw = rw if row_weight else None
    _op()(*leaves, t, rw).backward()  # first call: compiles nothing here, but warms caches
    for x in leaves:
        x.grad = None
    counter = _HostOps()
    with counter:
        _op()(*leaves, t, rw).backward()
    assert counter.launches == 2, counter.ops
    # zeros, t, addmm, mm, t, mm, sum, select, clone, slice (+ the row weights' sum) and
    # autograd's ones_like + three detach; the version before this one took 29 (30) ops
    assert len(counter.ops) <= (15 if row_weight else 14), counter.ops


# ------------------------------------------------------------------ backend choice and module
def test_auto_uses_reference_for_cpu_tensors(monkeypatch):
    calls = []

    def spy(*a, **k):
        calls.append(1)
        return fused_linear_distill_reference(*a, **k)

    monkeypatch.setattr(kernels, "fused_linear_distill_reference", spy)
    h, w, b, t, rw = _inputs(*SMALL, "cpu")
    out = fused_linear_distill(h, w, b, t, rw, backend="auto")
    assert calls == [1]
    assert torch.equal(out, fused_linear_distill_reference(h, w, b, t, rw))
    fused_linear_distill(h.double(), w.double(), None, t.double(), backend="auto")  # float64: reference too
    assert calls == [1, 1]


def test_triton_backend_error_when_unusable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = triton_usable()
    assert not ok and "TRITON_INTERPRET" in why
    h, w, b, t, rw = _inputs(*SMALL, "cpu")
    with pytest.raises(RuntimeError, match="backend='triton' is unusable: no CUDA device and TRITON_INTERPRET"):
        fused_linear_distill(h, w, b, t, rw, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_linear_distill(h, w, b, t, rw, backend="cuda")
    # auto still works: it falls back to the reference
    torch.testing.assert_close(fused_linear_distill(h, w, b, t, rw), fused_linear_distill_reference(h, w, b, t, rw))


def test_import_needs_no_triton():
    code = ("import sys, lowres_kd_kernels\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "assert 'lowres_kd_kernels.linear_distill' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_module_wrapper(device, backend):
    n, k, c = SMALL
    head = nn.Linear(k, c).to(device)
    loss_fn = FusedLinearDistill(alpha=0.4, beta=0.5, distance="cos_smoothl1", reduction="mean", backend=backend)
    assert "backend" in repr(loss_fn)
    h = torch.randn(n, k, device=device, requires_grad=True)
    t = torch.randn(n, c, device=device)
    mask = (torch.rand(n, device=device) > 0.2).float()
    loss = loss_fn(h, head, t, mask)
    loss.backward()
    h2 = h.detach().double().requires_grad_()
    w2 = head.weight.detach().double().requires_grad_()
    b2 = head.bias.detach().double().requires_grad_()
    ref = fused_linear_distill_reference(h2, w2, b2, t.double(), mask.double(), alpha=0.4, beta=0.5)
    ref.backward()
    _rel_close(loss, ref, 2e-6, 1e-5, "loss")
    for name, a, e in (("dH", h.grad, h2.grad), ("dW", head.weight.grad, w2.grad), ("db", head.bias.grad, b2.grad)):
        _rel_close(a, e, 2e-5, 1e-4, name)
    with pytest.raises(ValueError, match="backend"):
        FusedLinearDistill(backend="cuda")
