"""Low-memory teachers (DESIGN §3): quantized, checked for fidelity, offloaded block by block.

Why one package: the three tricks stack on one frozen teacher, in this order, and share one view
of where a module keeps its tensors (``tensors``, which knows bitsandbytes' hidden state):

    report = quantize_teacher(teacher, bits=4, device="cuda")      # 8 / 4-bit linears, in place
    check_fidelity(teacher_fidelity(fp32_teacher, teacher, images), 0.97, "vit", 4)
    offload = enable_offload(teacher, "cuda")                       # blocks stream from CPU memory

Move a quantized teacher with ``move_to(teacher, device)``, not ``.to(device)``.
"""
from .bnb_state import dequantize_linears
from .fidelity import FidelityError, FidelityReport, check_fidelity, teacher_fidelity
from .offload import BlockOffloader, OffloadStats, disable_offload, enable_offload, find_blocks
from .quantize import BITS, QuantReport, quantize_teacher, resolve_compute_dtype
from .tensors import UnsupportedLayerError, module_device, move_to, tensor_bytes

__all__ = [
    "BITS", "BlockOffloader", "FidelityError", "FidelityReport", "OffloadStats", "QuantReport",
    "UnsupportedLayerError", "check_fidelity", "dequantize_linears", "disable_offload", "enable_offload", "find_blocks",
    "module_device", "move_to", "quantize_teacher", "resolve_compute_dtype", "teacher_fidelity", "tensor_bytes",
]
