"""bitsandbytes layers through a state dict and back to full precision.

Why this file exists: a quantized base under a LoRA adapter is part of the *student*, so unlike a
frozen teacher it is saved in every checkpoint, loaded by ``lowres_kd.load`` and exported. Two
gaps in bitsandbytes 0.50 stand in the way:

- ``Linear8bitLt.load_state_dict`` refuses a layer whose row scales were already moved to
  ``layer.state`` (``tensors.settle_bnb`` does that at quantization, so a forward never moves
  them): the load hooks below put the scales where bitsandbytes looks for them during the load,
  and back afterwards.
- ``Linear4bit`` saves its quantization state (``weight.absmax``, ``weight.quant_map``, the
  nested statistics) but does not read it back: a strict load calls the entries unexpected, and
  a model built from other weights would keep its own block statistics. The pre-hook takes the
  entries out of the state dict and rebuilds ``weight.quant_state`` from them.

``dequantize_linears`` turns every bitsandbytes linear back into an fp32 ``nn.Linear`` holding
the weights the quantized layer computes with (export: the file must load into the plain family
network, and a LoRA delta is added to these weights, not re-quantized).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from .tensors import bnb_kind, is_bnb_module


def _int8_expose_scales(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    saved = state_dict.get(prefix + "weight")
    if saved is not None and (saved.dtype != torch.int8 or prefix + "SCB" not in state_dict):
        errors.append(f"{prefix}weight: the saved layer is not int8 with row scales ({saved.dtype}, "
                      f"SCB {'present' if prefix + 'SCB' in state_dict else 'missing'}): a full-precision state "
                      "cannot load into an 8-bit base (quantize it again from the weights)")
    if module.weight.SCB is None and module.state.SCB is not None:
        module.weight.SCB = module.state.SCB  # bitsandbytes copies the saved scales into this tensor


def _int8_settle_scales(module, incompatible_keys) -> None:
    if module.state.SCB is not None:
        module.weight.SCB = None  # settled again: the scales live on layer.state only


def _nf4_load_quant_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    from bitsandbytes.functional import QuantState

    key = prefix + "weight."
    saved: Dict[str, torch.Tensor] = {k[len(key):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(key)}
    if not saved:
        if prefix + "weight" in state_dict:
            errors.append(f"{prefix}weight: the saved layer has no nf4 quantization state (weight.absmax, "
                          "weight.quant_map, ...): a full-precision state cannot load into a 4-bit base")
        return
    state = QuantState.from_dict(saved, device=module.weight.device)
    module.weight.quant_state = state
    if getattr(module, "quant_state", None) is not None:
        module.quant_state = state


def add_load_hooks(layer: nn.Module) -> nn.Module:
    """Make a quantized ``Linear8bitLt`` / ``Linear4bit`` (as ``quantize_teacher`` builds them)
    load its own saved state: ``model.load_state_dict(saved)`` then restores it exactly."""
    kind = bnb_kind(layer)
    if kind == "int8":
        layer.register_load_state_dict_pre_hook(_int8_expose_scales)
        layer.register_load_state_dict_post_hook(_int8_settle_scales)
    elif kind is not None:
        layer.register_load_state_dict_pre_hook(_nf4_load_quant_state)
    return layer


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight a quantized linear computes with (int8 rows times their scales, or the
    nf4 blocks decoded)."""
    import bitsandbytes.functional as bnbf

    kind = bnb_kind(layer)
    if kind == "int8":
        codes = layer.state.CB if layer.state.CB is not None else layer.weight.data
        scales = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
        return bnbf.int8_vectorwise_dequant(codes, scales).float()
    if kind is not None:
        return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes linear that lowres_kd quantized")


def dequantize_linears(module: nn.Module) -> int:
    """Replace every bitsandbytes linear under ``module`` by an fp32 ``nn.Linear``, in place;
    returns how many were replaced. Shared layers stay shared."""
    done: Dict[int, nn.Linear] = {}
    for parent in list(module.modules()):
        for attr, child in list(parent._modules.items()):
            if child is None or not is_bnb_module(child) or bnb_kind(child) is None:
                continue
            if id(child) not in done:
                weight = dequantized_weight(child)
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=weight.device)
                with torch.no_grad():
                    plain.weight.copy_(weight)
                    if child.bias is not None:
                        plain.bias.copy_(child.bias.float())
                plain.requires_grad_(child.weight.requires_grad)
                plain.train(child.training)
                done[id(child)] = plain
            setattr(parent, attr, done[id(child)])
    return len(done)
