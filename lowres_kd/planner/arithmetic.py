"""The planner's byte formulas: plain arithmetic on parameter counts and shapes (DESIGN §3).

Everything here is a function of numbers, so each rule can be checked by hand:

- quantized teacher linears (``lowres_kd.lowmem.quantize_teacher``'s bitsandbytes layouts):
  int8: 1 byte a weight + one fp32 scale per output row + the bias; nf4: half a byte a weight,
  one uint8 absmax per 64-weight block, the absmaxes themselves quantized in blocks of 256 (one
  fp32 each), a 16-entry fp32 code, a 256-entry fp32 code for the nested statistics, one fp32
  offset, and the bias in the bf16 compute dtype;
- the training state of the student and heads under each engine (``engine_state``);
- bitsandbytes' 8-bit AdamW state (tensors under 4096 elements keep fp32 moments).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from ..lowmem.quantize import NF4_BLOCKSIZE

NF4_NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the quantized absmax ("double quant")
NF4_FIXED_BYTES = 16 * 4 + 256 * 4 + 4  # nf4 code book, nested code book, offset: per layer
ADAM8BIT_MIN_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 moments
ADAM8BIT_BLOCKSIZE = 256  # one fp32 absmax per 256 elements, per moment
ADAM8BIT_QMAP_BYTES = 2 * 256 * 4  # the two dynamic quantization maps, shared by all tensors


def linear_bytes(out_features: int, in_features: int, bias: bool, bits: int, dtype_bytes: int) -> int:
    """Bytes of one ``nn.Linear`` held at ``bits`` (16: as ``dtype_bytes`` floats)."""
    n = out_features * in_features
    if bits == 8:
        return n + 4 * out_features + (dtype_bytes * out_features if bias else 0)
    if bits == 4:
        blocks = math.ceil(n / NF4_BLOCKSIZE)
        return ((n + 1) // 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE) + NF4_FIXED_BYTES
                + (2 * out_features if bias else 0))
    return dtype_bytes * (n + (out_features if bias else 0))


@dataclass
class Weights:
    """The tensors of one part of a model: linears that quantization replaces, and the rest."""

    linears: List[Tuple[int, int, bool]] = field(default_factory=list)  # (out, in, bias)
    float_numel: int = 0  # floating tensors outside those linears (convs, norms, embeddings, ...)
    fixed_bytes: int = 0  # non-floating buffers (counters), whatever the dtype

    def nbytes(self, bits: int, dtype_bytes: int) -> int:
        return (sum(linear_bytes(o, i, b, bits, dtype_bytes) for o, i, b in self.linears)
                + self.float_numel * dtype_bytes + self.fixed_bytes)

    @property
    def numel(self) -> int:
        return sum(o * i + (o if b else 0) for o, i, b in self.linears) + self.float_numel


def teacher_weight_bytes(outside: Weights, blocks: Sequence[Weights], bits: int, dtype_bytes: int,
                         offload: bool) -> Tuple[int, int]:
    """(device bytes, CPU bytes) of a teacher's weights.

    Resident: everything. Offloaded (``lowres_kd.lowmem.enable_offload``): what lies outside the
    block list stays on the device, plus the two consecutive blocks staged at once (the one
    running and the next, copied ahead of use); the block list lives in CPU memory.
    """
    out = outside.nbytes(bits, dtype_bytes)
    per_block = [b.nbytes(bits, dtype_bytes) for b in blocks]
    if not offload:
        return out + sum(per_block), 0
    pair = max((a + b for a, b in zip(per_block, per_block[1:])), default=sum(per_block))
    return out + pair, sum(per_block)


def adamw8bit_bytes(sizes: Sequence[int]) -> int:
    """bitsandbytes AdamW8bit state for tensors of these element counts."""
    small = [n for n in sizes if n < ADAM8BIT_MIN_SIZE]
    large = [n for n in sizes if n >= ADAM8BIT_MIN_SIZE]
    return (8 * sum(small) + sum(2 * n + 8 * math.ceil(n / ADAM8BIT_BLOCKSIZE) for n in large)
            + (ADAM8BIT_QMAP_BYTES if large else 0))


def moment_bytes(sizes: Sequence[int], optim_name: str) -> int:
    """AdamW's two moments: fp32 (8 bytes a parameter), or bitsandbytes' 8-bit layout."""
    return adamw8bit_bytes(sizes) if optim_name == "adamw8bit" else 8 * sum(sizes)


@dataclass
class EngineSettings:
    engine: str  # torch | deepspeed
    bf16: bool  # mixed precision (DeepSpeed keeps bf16 weights; the torch engine autocasts fp32 weights)
    world_size: int = 1
    optim_name: str = "adamw"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket: int = 0  # DeepSpeed gradient-reduction bucket, elements
    overlap_comm: bool = False  # DeepSpeed: a second reduction bucket
    prefetch_bucket: int = 0  # DeepSpeed ZeRO-3: parameters gathered ahead of use, elements


def engine_state(trainable: Sequence[int], frozen_numel: int, largest_layer: int,
                 s: EngineSettings) -> Dict[str, Tuple[int, int, str]]:
    """Per component: (device bytes, CPU bytes, how it was counted), for the parameters the engine
    manages: ``trainable`` (element count of each trainable tensor) and ``frozen_numel`` frozen
    floating elements of the same modules (the base weights in adapter mode).

    torch engine: fp32 parameters (bf16 autocast computes from them), fp32 gradients, AdamW moments
    (8 bytes a parameter; 8-bit AdamW about 2); with several ranks one flat fp32 copy of all
    gradients for the all-reduce. DeepSpeed: bf16 parameters and gradients (fp32 without bf16), and
    per trainable parameter an fp32 master copy (bf16 only) and the moments; ZeRO partitions over
    the ranks stage 1: optimizer state, 2: + gradients, 3: + parameters (frozen ones too).
    ``offload_optimizer``: master copy, moments and the fp32 gradient partition in CPU memory;
    ``offload_param`` (stage 3): parameters in CPU memory, with only the gathered working set (the
    prefetch bucket plus the largest layer) on the device. DeepSpeed's own buffers, as its 0.19
    source allocates them (read, not measured here): at stages 0-1 with bf16 and no offload its
    BF16_Optimizer keeps fp32 gradients of every trainable parameter and no bucket; otherwise
    ZeRO reduces gradients through a bucket of ``reduce_bucket`` elements (fp32 at stage 1, the
    parameter dtype from stage 2; two with ``overlap_comm``), allocated whatever the model's size;
    ZeRO-3 with several ranks adds the gathered working set.
    """
    p = sum(trainable)
    w = max(1, s.world_size)
    moments = moment_bytes(trainable, s.optim_name)
    if s.engine == "torch":
        out = {"params": (4 * p, 0, "fp32"), "frozen": (4 * frozen_numel, 0, "fp32"),
               "grads": (4 * p, 0, "fp32"),
               "optimizer": (moments, 0, f"{s.optim_name} moments")}
        out["buffers"] = (4 * p if w > 1 else 0, 0, "flat fp32 gradient copy for the all-reduce" if w > 1 else "none")
        return out
    lp = 2 if s.bf16 else 4
    stage = s.zero_stage
    dtype = "bf16" if s.bf16 else "fp32"
    params_div = w if stage >= 3 else 1
    params = lp * p // params_div
    frozen = lp * frozen_numel // params_div
    if s.offload_param:
        gathered = lp * min(p + frozen_numel, s.prefetch_bucket + largest_layer)
        param_row = (gathered, params, f"{dtype}, ZeRO-3 partition in CPU memory; gathered working set on the device")
        frozen_row = (0, frozen, f"{dtype}, ZeRO-3 partition in CPU memory")
    else:
        param_row = (params, 0, dtype + (f" / {w} ranks" if params_div > 1 else ""))
        frozen_row = (frozen, 0, dtype + (f" / {w} ranks" if params_div > 1 else ""))
    grads_div = w if stage >= 2 else 1
    grads = lp * p // grads_div
    grads_note = dtype + (f" / {w} ranks" if grads_div > 1 else "")
    bf16_optimizer = s.bf16 and stage <= 1 and not s.offload_optimizer  # DeepSpeed's BF16_Optimizer
    if bf16_optimizer:
        grads += 4 * p
        grads_note += " + fp32 accumulation"
    opt = ((4 * p if s.bf16 else 0) + moments) // (w if stage >= 1 else 1)
    opt_note = ("fp32 master + " if s.bf16 else "") + f"{s.optim_name} moments" + (f" / {w} ranks" if stage >= 1 and w > 1 else "")
    grads_cpu = 0
    if s.offload_optimizer:
        opt_row = (0, opt, opt_note + ", in CPU memory")
        grads_cpu = 4 * p // w
        grads_note += " (fp32 partition in CPU memory)"
    else:
        opt_row = (opt, 0, opt_note)
    buckets = 0
    if stage >= 1 and not bf16_optimizer:  # DeepSpeedZeroOptimizer / stage 3 reduce through a bucket
        buckets = (4 if stage == 1 else lp) * s.reduce_bucket * (2 if s.overlap_comm else 1)
    if stage >= 3 and not s.offload_param and w > 1:
        buckets += lp * min(p + frozen_numel, s.prefetch_bucket + largest_layer)
    return {"params": param_row, "frozen": frozen_row, "grads": (grads, grads_cpu, grads_note), "optimizer": opt_row,
            "buffers": (buckets, 0, f"reduction bucket{'s' if s.overlap_comm else ''}" if buckets else "none")}

