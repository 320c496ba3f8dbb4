"""Counting the bytes a forward and backward keep alive, on the ``meta`` device (DESIGN §3, planner).

Why a dispatch mode, not ``saved_tensors_hooks`` alone: the hooks see what autograd saves, but a
training step also keeps tensors alive by other routes: the inputs of a checkpointed segment
(held by non-reentrant checkpointing's closure, invisible to the outer hooks), the model's
outputs, the fused loss's gradients stashed in forward. ``LiveBytes`` records every storage an op
creates while the mode is active and drops it when the storage is freed (a weak reference on the
storage), so ``current`` is what is alive now and ``peak`` the most that was, as
``torch.cuda.max_memory_allocated`` counts them (before the allocator rounds each block up to a
multiple of 512 bytes). Storages that existed before (parameters, inputs)
are never counted; views share their base's storage and count once. It works the same on real
and on meta tensors: on meta nothing is allocated, so a step of a large model costs milliseconds.

``emulate_device``: a meta forward is a shape-level stand-in for the device's forward, with three
corrections, made in the functions of ``torch.nn.functional`` (so before autograd records the
op, and what autograd saves is what it saves on the device):

- attention: ``F.scaled_dot_product_attention`` on meta tensors takes the math path, which saves
  the (L x L) attention matrix per head; CPU and CUDA run a flash kernel that saves the output
  and one fp32 log-sum-exp per query. Meta calls go to the CPU flash op (it has a meta kernel).
- batch norm in eval mode (a frozen CNN's): meta's kernel returns C-long per-channel statistics
  that autograd saves; CPU and CUDA return empty ones. Meta calls keep the input only, as they do.
- bf16 autocast (``autocast_dtype``): CUDA's autocast ignores meta tensors (and is off without
  CUDA), so its casts are made here: bf16 copies of fp32 inputs and weights for linear,
  convolution and attention, fp32 copies for layer/group norm, softmax and the loss functions
  CUDA autocast runs in fp32; casts of trainable leaves are cached, as autocast caches them.
  Approximation: only these ``F`` functions are covered; a ``@`` / ``torch.matmul`` in model code
  runs in its inputs' dtype here, where CUDA autocast would cast it.

Why the functions are swapped for the duration of a measurement instead of a
``TorchFunctionMode``: checkpointed segments recompute their forward inside backward, where
function modes do not reach (they are not part of the autograd engine's thread state), and the
recompute must take the same path as the forward (checkpointing checks the saved shapes). The
originals are put back when the context exits; nothing outside a measurement sees the swap.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["LiveBytes", "emulate_device"]


def _tensors(obj):
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as live: ...``; ``live.current`` bytes alive of those created inside,
    ``live.peak`` the most at once (``reset_peak()`` restarts it from ``current``). Storages are
    tagged with ``live.phase`` when created; ``by_phase()`` gives the bytes alive per tag, and
    ``made_before_peak(tensors)`` how many bytes of these (still alive) tensors existed at the peak.
    ``live.flops`` counts the FLOPs of the ops it sees with ``torch.utils.flop_counter``'s formulas
    (``FlopCounterMode`` itself is not used: its module tracking holds tensors through a
    checkpointed backward and changed the very peak measured here by 70 %)."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self.flops = 0
        self.phase = ""
        self._made = 0  # storages created so far; the peak was reached after the first _peak_made
        self._peak_made = 0
        self._live: Dict[int, Tuple[weakref.ref, int, str, int]] = {}
        self._external: Dict[int, weakref.ref] = {}  # storages made before the mode, while they live

    def reset_peak(self) -> None:
        self.peak = self.current
        self._peak_made = self._made

    def by_phase(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for _, nbytes, phase, _ in self._live.values():
            out[phase] = out.get(phase, 0) + nbytes
        return out

    def made_before_peak(self, tensors) -> int:
        """Bytes of the storages of ``tensors`` (alive now, made inside the mode) that already
        existed when ``peak`` was reached: e.g. the gradients a backward had made by its peak."""
        keys = {t.untyped_storage()._cdata for t in tensors}
        return sum(n for k, (_, n, _, made) in self._live.items() if k in keys and made <= self._peak_made)

    def _freed(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in _tensors((args, kwargs)):
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self._live and key not in self._external:  # made before the mode (weights, inputs):
                self._external[key] = weakref.ref(storage, lambda _, k=key: self._external.pop(k, None))  # never counted
        out = func(*args, **(kwargs or {}))
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **(kwargs or {}), out_val=out)
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live or key in self._external:
                continue  # a view, or an in-place result
            nbytes = storage.nbytes()
            self._made += 1
            self._live[key] = (weakref.ref(storage, lambda _, k=key: self._freed(k)), nbytes, self.phase, self._made)
            self.current += nbytes
            if self.current > self.peak:
                self.peak, self._peak_made = self.current, self._made
        return out


_LOWER = ("linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
          "conv_transpose3d", "scaled_dot_product_attention")  # CUDA autocast: lower precision
_FP32 = ("layer_norm", "group_norm", "softmax", "log_softmax", "cosine_similarity", "smooth_l1_loss", "huber_loss",
         "mse_loss", "l1_loss", "kl_div", "cross_entropy", "binary_cross_entropy_with_logits")  # CUDA autocast: fp32


def _flash_attention(original):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.is_meta and attn_mask is None and not enable_gqa:
            out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                               scale=scale)
            return out
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    return sdpa


class _EvalBatchNorm(torch.autograd.Function):
    """Batch norm in eval mode, for meta tensors: keeps the input for backward, as CPU and CUDA do
    (their per-channel save_mean / save_invstd are empty in eval mode; meta's are C long)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x)
        ctx.channels = x.shape[1]
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        need = ctx.needs_input_grad
        per_channel = [grad.new_empty(ctx.channels) if n else None for n in need[1:]]
        return (torch.empty_like(grad) if need[0] else None, *per_channel)


def _batch_norm(original):
    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        if input.is_meta and not training and running_mean is not None:
            return _EvalBatchNorm.apply(input, weight, bias)
        return original(input, running_mean, running_var, weight, bias, training, momentum, eps)

    return batch_norm


def _casting(original, src: torch.dtype, dst: torch.dtype, cache: Dict[int, torch.Tensor]):
    def cast(t):
        if not isinstance(t, torch.Tensor) or t.dtype != src:
            return t
        if t.is_leaf and t.requires_grad:  # autocast caches casts of trainable leaves
            if id(t) not in cache:
                cache[id(t)] = t.to(dst)
            return cache[id(t)]
        return t.to(dst)

    def fn(*args, **kwargs):
        args, kwargs = tree_map(cast, (args, kwargs))
        return original(*args, **kwargs)

    return fn


@contextlib.contextmanager
def emulate_device(autocast_dtype: Optional[torch.dtype] = None):
    """Within: flash attention and eval-mode batch norm as the devices run them, on meta tensors;
    with ``autocast_dtype``, CUDA autocast's casts."""
    saved = {name: getattr(F, name) for name in ("scaled_dot_product_attention", "batch_norm") + _LOWER + _FP32}
    cache: Dict[int, torch.Tensor] = {}
    try:
        F.scaled_dot_product_attention = _flash_attention(saved["scaled_dot_product_attention"])
        F.batch_norm = _batch_norm(saved["batch_norm"])
        if autocast_dtype is not None:
            for name in _LOWER:
                setattr(F, name, _casting(getattr(F, name), torch.float32, autocast_dtype, cache))
            for name in _FP32:
                setattr(F, name, _casting(getattr(F, name), autocast_dtype, torch.float32, cache))
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)
