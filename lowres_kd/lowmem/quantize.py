"""Quantized teachers (DESIGN §3): a frozen teacher's ``nn.Linear`` layers become bitsandbytes layers.

Why a wrapper, not code in each teacher family: quantization is a property of how a teacher is
*held*, not of what it computes, so any registered teacher gets it by walking its modules; a
new family needs nothing.

What happens, in place:

- ``bits=8``: ``Linear8bitLt(has_fp16_weights=False, threshold=6.0)`` (LLM.int8: int8 weights
  with one fp32 scale per output row; input columns with an |activation| > 6 go through an fp16
  matmul). bitsandbytes casts the activations to fp16 inside this layer whatever the teacher's
  dtype; there is no compute-dtype knob for it.
- ``bits=4``: ``Linear4bit`` nf4, blocks of 64 weights, with the block statistics themselves
  quantized (bitsandbytes' "double quant", ``compress_statistics=True``: about 4.13 bits a weight
  instead of 4.5). Compute dtype: bf16 by default, the DESIGN's choice: every CPU torch runs
  bf16 matmuls, and CUDA devices where ``torch.cuda.is_bf16_supported()`` holds; fp32 elsewhere
  (pre-Ampere GPUs; fp16 is not chosen because ViT activations can overflow it). The bias is
  cast to the compute dtype now (bitsandbytes would do it on the first forward, changing the
  byte count behind the report's back). bitsandbytes' packed CPU format for 4-bit weights is
  turned off (``support_avx512bf16_for_cpu = False``): it repacks weights in place on the first
  CPU forward (un-nesting the statistics: more bytes than reported), it asserts on layers whose
  output width is not a multiple of 32 or whose input width is odd, and a repacked layer can no
  longer be moved to a GPU or offloaded.
- ``bits=16``: nothing is quantized (the report still counts bytes).

Everything else stays as it was: convolutions, norms, embeddings, positional tables, subclasses
of ``nn.Linear`` (``nn.MultiheadAttention`` reads ``out_proj.weight`` directly, so swapping them
would break their parent), layers matched by ``exclude``, and any layer bitsandbytes refuses
(the reason is recorded). The report says how many bytes that is: CNN teachers are mostly
convolutions, and their report shows it.

Moving: bitsandbytes quantizes a layer when it is moved with ``.to(device)``; each new layer is
moved on its own, so the device holds at most one extra full-precision layer at a time, then
the rest of the teacher is moved with ``lowmem.move_to`` (``Module.to`` on a parent leaves
``Linear8bitLt``'s int8 state behind: move quantized teachers with ``move_to``).

Saving: every new layer carries the load hooks of ``bnb_state``, so a module holding them (the
student, when its adapter-mode base is quantized) loads its own ``state_dict`` back exactly.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .bnb_state import add_load_hooks
from .tensors import bnb_kind, group_slots, is_bnb_module, move_to, settle_bnb, tensor_bytes, tensor_key, tensor_slots

BITS = (4, 8, 16)
INT8_THRESHOLD = 6.0
NF4_BLOCKSIZE = 64


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes logs 'inputs will be cast ... to float16' on *every* 8-bit matmul; keep the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


def _quiet_bnb() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in logger.filters):
        logger.addFilter(_DropInt8CastNotice())


@dataclass
class QuantReport:
    """Bytes of a teacher before and after quantization (every distinct tensor, quant state included)."""

    bits: int
    compute_dtype: Optional[str]  # the 4-bit layers' compute dtype; None for 8 bits (fp16 inside bnb) and 16
    device: str
    bytes_before: int  # the whole teacher as it was stored (fp32 for the shipped and timm teachers)
    bytes_after: int  # the whole teacher after: quantized layers + everything left as it was
    quantized_bytes_before: int  # the layers that were quantized, before
    quantized_bytes_after: int  # the same layers after: packed weights + scales / quant state + bias
    unquantized_bytes: int  # bytes_after - quantized_bytes_after: tensors left as they were
    unquantized_modules: int  # modules holding tensors that stayed as they were (convs, norms, ...)
    unquantized_by_type: Dict[str, int] = field(default_factory=dict)  # module class -> bytes left as stored
    quantized_names: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # nn.Linear name -> why it stayed full precision

    @property
    def n_quantized(self) -> int:
        return len(self.quantized_names)

    @property
    def ratio(self) -> float:
        """bytes_after / bytes_before for the whole teacher."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    @property
    def unquantized_fraction(self) -> float:
        """Share of the quantized teacher's bytes that are not in quantized layers."""
        return self.unquantized_bytes / self.bytes_after if self.bytes_after else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "n_quantized": self.n_quantized, "ratio": self.ratio,
                "unquantized_fraction": self.unquantized_fraction}

    def summary(self) -> str:
        mib = 2.0**20
        kinds = ", ".join(f"{k} {v / mib:.2f}" for k, v in sorted(self.unquantized_by_type.items(), key=lambda kv: -kv[1]))
        text = (f"{self.bits}-bit: {self.bytes_before / mib:.2f} MiB -> {self.bytes_after / mib:.2f} MiB "
                f"({self.ratio:.3f}x); {self.n_quantized} linear layers quantized "
                f"({self.quantized_bytes_before / mib:.2f} -> {self.quantized_bytes_after / mib:.2f} MiB); "
                f"{self.unquantized_bytes / mib:.2f} MiB in {self.unquantized_modules} modules left as stored "
                f"({100 * self.unquantized_fraction:.0f}% of the result)")
        if kinds:
            text += f" [MiB by type: {kinds}]"
        if self.skipped:
            text += f"; {len(self.skipped)} linear layers skipped: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return text


def resolve_compute_dtype(device: Union[str, torch.device], compute_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The 4-bit compute dtype: the one asked for, else bf16 where usable (CPU, CUDA with bf16), else fp32."""
    if compute_dtype is not None:
        if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"compute_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {compute_dtype}")
        return compute_dtype
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" else torch.float32


def _make_int8(lin: nn.Linear, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb  # optional (gpu extra), heavy: only for 8/4-bit layers and optimizers

    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
    q.weight = bnb.nn.Int8Params(lin.weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().to("cpu"), requires_grad=False)
    q = q.to(device)  # bitsandbytes quantizes here
    settle_bnb(q)
    return add_load_hooks(q)


def _make_nf4(lin: nn.Linear, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb  # optional (gpu extra), heavy: only for 8/4-bit layers and optimizers

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                          compress_statistics=True, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.detach().to("cpu"), requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                 compress_statistics=True, quant_type="nf4", module=q)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().to("cpu", compute_dtype), requires_grad=False)
    q.support_avx512bf16_for_cpu = False  # no in-place CPU repacking (see the module docstring)
    q = q.to(device)  # bitsandbytes quantizes here
    if q.weight.quant_state is None:
        raise RuntimeError("bitsandbytes did not quantize the layer on .to(device)")
    return add_load_hooks(q)


def _linear_sites(module: nn.Module) -> List[Tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, dotted name, child) for every Linear-like child, shared ones listed per parent."""
    names = {id(m): n for n, m in module.named_modules(remove_duplicate=False)}
    sites = []
    for parent in module.modules():
        for attr, child in parent._modules.items():
            if isinstance(child, nn.Linear) and not is_bnb_module(child):
                prefix = names[id(parent)]
                sites.append((parent, attr, f"{prefix}.{attr}" if prefix else attr, child))
    return sites


def quantize_teacher(teacher: nn.Module, bits: int, compute_dtype: Optional[torch.dtype] = None,
                     device: Union[str, torch.device] = "cpu", exclude: Sequence[str] = ()) -> QuantReport:
    """Replace every ``nn.Linear`` of ``teacher`` by a bitsandbytes 8-bit or nf4 layer, in place.

    ``bits``: 8, 4, or 16 (nothing quantized). ``compute_dtype``: of the 4-bit layers (default
    bf16, fp32 where bf16 is not usable). ``device``: where the teacher ends up (bitsandbytes
    quantizes on ``.to(device)``). ``exclude``: glob patterns of module names to keep in full
    precision (e.g. ``"net.classifier.*"``). The teacher is frozen (``eval()``, no gradients).

    Returns a :class:`QuantReport`; ``report.summary()`` is one line for logs.

    Example::

        teacher = build_teacher(TeacherConfig(name="vit", family="timm", model="vit_small_patch16_224"))
        report = quantize_teacher(teacher, bits=4, device="cuda")
        print(report.summary())   # 4-bit: 82.63 MiB -> 12.09 MiB (0.146x); 48 linear layers quantized ...
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS} (16: no quantization), got {bits!r}")
    if isinstance(teacher, nn.Linear):
        raise ValueError("quantize_teacher replaces layers inside a module; wrap a bare nn.Linear in nn.Sequential")
    if getattr(teacher, "lowmem_offload", None) is not None:
        raise ValueError("the teacher is offloaded: quantize first, then offload (or call disable_offload(teacher))")
    device = torch.device(device)
    present = [n for n, m in teacher.named_modules() if is_bnb_module(m)]
    if present and bits != 16:
        raise ValueError(f"the teacher is already quantized ({len(present)} bitsandbytes layers, e.g. {present[0]!r}); "
                         "build it again from its weights to quantize it to another bit width")
    teacher.eval()
    teacher.requires_grad_(False)
    bytes_before = tensor_bytes(teacher)
    cdtype = resolve_compute_dtype(device, compute_dtype) if bits == 4 else None
    skipped: Dict[str, str] = {}
    quantized: List[str] = []
    quantized_before = 0
    if bits != 16:
        import bitsandbytes  # noqa: F401  (fail here, with its own message, when it is missing)

        _quiet_bnb()
        done: Dict[int, nn.Module] = {}
        for parent, attr, name, lin in _linear_sites(teacher):
            if any(fnmatch.fnmatchcase(name, p) for p in exclude):
                skipped[name] = "excluded by pattern"
                continue
            if type(lin) is not nn.Linear:
                skipped[name] = (f"{type(lin).__name__} is a subclass of nn.Linear: its parent may read .weight "
                                 "directly, so it is not swapped")
                continue
            if id(lin) not in done:
                before = tensor_bytes(lin)
                try:
                    done[id(lin)] = _make_int8(lin, device) if bits == 8 else _make_nf4(lin, device, cdtype)
                except Exception as exc:  # a shape or device bitsandbytes refuses: keep the layer as it is
                    skipped[name] = f"bitsandbytes refused it: {type(exc).__name__}: {exc}"[:300]
                    continue
                quantized_before += before
            setattr(parent, attr, done[id(lin)])
            quantized.append(name)
    teacher.eval()  # the new layers are built in training mode
    move_to(teacher, device)
    return _report(teacher, bits, cdtype, device, bytes_before, quantized_before, quantized, skipped)


def _report(teacher, bits, cdtype, device, bytes_before, quantized_before, quantized, skipped) -> QuantReport:
    quantized_groups = group_slots(s for m in teacher.modules() if bnb_kind(m) for s in tensor_slots(m))
    quantized_after = sum(t.numel() * t.element_size() for t, _ in quantized_groups)
    seen = {tensor_key(t) for t, _ in quantized_groups}
    by_type: Dict[str, int] = {}
    modules_left = 0
    for m in teacher.modules():  # what stayed as it was, by the class of the module that owns it
        if is_bnb_module(m):
            continue
        own = [t for t in list(m._parameters.values()) + list(m._buffers.values()) if t is not None and t.numel()]
        modules_left += bool(own)
        for t in own:
            if tensor_key(t) not in seen:
                seen.add(tensor_key(t))
                by_type[type(m).__name__] = by_type.get(type(m).__name__, 0) + t.numel() * t.element_size()
    bytes_after = tensor_bytes(teacher)
    return QuantReport(bits=bits, compute_dtype=None if cdtype is None else str(cdtype).replace("torch.", ""),
                       device=str(device), bytes_before=bytes_before, bytes_after=bytes_after,
                       quantized_bytes_before=quantized_before, quantized_bytes_after=quantized_after,
                       unquantized_bytes=bytes_after - quantized_after, unquantized_modules=modules_left,
                       unquantized_by_type=by_type, quantized_names=quantized, skipped=skipped)
