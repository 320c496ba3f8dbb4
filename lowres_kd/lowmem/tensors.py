"""Where a module keeps its tensors, including the ones bitsandbytes hides outside parameters.

Why this file exists: a bitsandbytes layer keeps part of its weight outside ``parameters()`` and
``buffers()`` (8-bit: the row scales ``SCB`` and the int8 matrix on ``layer.state``; 4-bit: the
block absmax, the code book and the nested statistics on ``weight.quant_state``). Counting bytes
with ``parameters()`` under-reports them, and moving them with ``Module.to`` on a *parent* module
leaves ``Linear8bitLt.state.CB/SCB`` on the old device (only ``Linear8bitLt.to`` itself moves them).
So byte reports (``quantize``) and block offloading (``offload``) both go through one list of
*slots*: (owner, kind, name) places that each hold one tensor. Moving a module means copying each
distinct tensor once and pointing every slot that shared it at the copy; nothing is re-quantized.

Only the two bitsandbytes layouts this package creates are understood (``Linear8bitLt`` with int8
weights, ``Linear4bit`` without bitsandbytes' packed-CPU format); any other bitsandbytes module
holding tensors is refused with a message rather than moved half-way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn


class UnsupportedLayerError(RuntimeError):
    """A module keeps tensors in a way this package cannot account for or move safely."""


@dataclass(frozen=True, eq=False)  # owners compare by identity (QuantState defines a tensor __eq__)
class Slot:
    """One place holding a tensor: a parameter, a buffer, or a plain attribute of an object."""

    owner: object
    kind: str  # "param" | "buffer" | "attr"
    name: str

    def get(self) -> Optional[torch.Tensor]:
        if self.kind == "param":
            p = self.owner._parameters[self.name]
            return None if p is None else p.data
        if self.kind == "buffer":
            return self.owner._buffers[self.name]
        return getattr(self.owner, self.name)

    def set(self, tensor: torch.Tensor) -> None:
        if self.kind == "param":
            self.owner._parameters[self.name].data = tensor  # keeps the Parameter (and its subclass state)
        elif self.kind == "buffer":
            self.owner._buffers[self.name] = tensor
        else:
            setattr(self.owner, self.name, tensor)


def is_bnb_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def bnb_kind(module: nn.Module) -> Optional[str]:
    """'int8' / 'nf4' / 'fp4' for the bitsandbytes linears this package understands, else None."""
    if not is_bnb_module(module):
        return None
    import bitsandbytes as bnb  # optional (gpu extra), heavy: only for 8/4-bit layers and optimizers

    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    if isinstance(module, bnb.nn.Linear4bit):
        return getattr(module.weight, "quant_type", "nf4")
    return None


def settle_bnb(module: nn.Module) -> None:
    """Put a quantized bitsandbytes linear in the state its forward would leave it in.

    ``Linear8bitLt`` moves ``weight.CB/SCB`` to ``state.CB/SCB`` on its first forward
    (``init_8bit_state``); doing it now means a forward never changes where tensors live.
    """
    if bnb_kind(module) == "int8" and getattr(module.weight, "CB", None) is not None:
        module.init_8bit_state()


def _bnb_extra_slots(module: nn.Module, name: str) -> List[Slot]:
    kind = bnb_kind(module)
    if kind is None:
        has_tensors = any(t is not None for t in list(module._parameters.values()) + list(module._buffers.values()))
        if has_tensors:
            raise UnsupportedLayerError(
                f"{name or 'module'} is a bitsandbytes {type(module).__name__}: lowres_kd.lowmem understands only "
                "the Linear8bitLt / Linear4bit layers that quantize_teacher creates")
        return []
    if kind == "int8":
        if module.state.has_fp16_weights:
            raise UnsupportedLayerError(f"{name}: Linear8bitLt with has_fp16_weights=True is not supported (weights "
                                        "would be re-quantized on every move); quantize with has_fp16_weights=False")
        settle_bnb(module)
        if module.weight.data.dtype != torch.int8:
            raise UnsupportedLayerError(f"{name}: Linear8bitLt is not quantized yet (call .to(device) on it first)")
        return [Slot(module.state, "attr", "CB"), Slot(module.state, "attr", "SCB")]
    qs = getattr(module.weight, "quant_state", None)
    if qs is None:
        raise UnsupportedLayerError(f"{name}: Linear4bit is not quantized yet (bitsandbytes quantizes it on .to(device))")
    if getattr(qs, "packing_format_for_cpu", False):
        raise UnsupportedLayerError(
            f"{name}: Linear4bit was repacked into bitsandbytes' CPU-only format by a CPU forward; quantize with "
            "lowres_kd.lowmem.quantize_teacher, which turns that repacking off")
    slots = [Slot(qs, "attr", "absmax"), Slot(qs, "attr", "code")]
    if qs.nested:
        slots += [Slot(qs, "attr", "offset"), Slot(qs.state2, "attr", "absmax"), Slot(qs.state2, "attr", "code")]
    return slots


def tensor_slots(module: nn.Module, prefix: str = "") -> List[Slot]:
    """Every slot under ``module``: parameters, buffers and the bitsandbytes quantization state."""
    slots: List[Slot] = []
    for name, m in module.named_modules(prefix=prefix):
        slots += [Slot(m, "param", n) for n, p in m._parameters.items() if p is not None]
        slots += [Slot(m, "buffer", n) for n, b in m._buffers.items() if b is not None]
        if is_bnb_module(m):
            slots += _bnb_extra_slots(m, name)
    return [s for s in slots if s.get() is not None]


def tensor_key(t: torch.Tensor) -> Tuple:
    """Identity of a tensor's memory; meta tensors have none (data pointer 0): the object stands in."""
    where = id(t) if t.is_meta else t.data_ptr()
    return (t.device, where, t.dtype, t.numel(), tuple(t.shape))


def group_slots(slots: Iterable[Slot]) -> List[Tuple[torch.Tensor, List[Slot]]]:
    """Distinct tensors (views of the same memory with the same shape count once) and their slots."""
    groups: Dict[Tuple, Tuple[torch.Tensor, List[Slot]]] = {}
    for s in slots:
        t = s.get()
        groups.setdefault(tensor_key(t), (t, []))[1].append(s)
    return list(groups.values())


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every distinct tensor the module holds (weights, buffers, quantization state)."""
    return sum(t.numel() * t.element_size() for t, _ in group_slots(tensor_slots(module)))


def move_to(module: nn.Module, device, pin_memory: bool = False) -> nn.Module:
    """Move every tensor of ``module`` (bitsandbytes state included) to ``device``; returns it.

    Use this, not ``.to(device)``, for a quantized teacher: ``Module.to`` on a parent leaves
    ``Linear8bitLt.state`` behind. Tensors already on ``device`` are left in place.
    """
    device = torch.device(device)
    for t, slots in group_slots(tensor_slots(module)):
        if t.device == device and (not pin_memory or t.is_pinned()):
            continue
        moved = t.to(device)
        if pin_memory and device.type == "cpu":
            moved = moved.pin_memory()
        for s in slots:
            s.set(moved)
    return module


def module_device(module: nn.Module) -> torch.device:
    """Where the module computes: an offloaded teacher's device, else that of its first tensor."""
    offload = getattr(module, "lowmem_offload", None)
    if offload is not None:
        return offload.device
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
