"""Layer offloading (DESIGN §3): a teacher's blocks live in CPU memory and visit the device one at a time.

Why: a frozen teacher's weights are needed only while its blocks run, one after the other. Keeping
the block list in (pinned) CPU memory and copying block i+1 to the device on a side CUDA stream
while block i computes brings the teacher's device weight memory down to what lies outside the
block list plus about two blocks, at the price of one host-to-device copy of the weights per
forward (hidden behind compute when a block's compute outlasts its copy).

How: ``enable_offload(teacher, device)`` finds the block list (a timm ViT's ``net.blocks``,
MobileNetV2's ``net.features``, EfficientNet's ``net._blocks``, HED's ``blocks``: generically the
``nn.Sequential``/``nn.ModuleList`` whose children hold the most weight bytes, or the attribute
path given as ``blocks=``), moves everything else to ``device`` for good, and puts forward hooks
on each block and on the teacher:

- teacher pre-hook: stage block 0 (start its copy), so the stem runs while it arrives;
- block i pre-hook: wait for block i's copy, point its parameters at it, stage block i+1;
- block i hook: point block i back at its CPU tensors and drop the device copy;
- a block that is a bare container (HED's ``ModuleList`` of convs: never called itself) is
  brought in by a pre-hook on each of its layers and dropped when the next block comes in;
- teacher hook: drop whatever is still staged (a teacher that stops early, e.g. ``layer: k``).

Tensors move through ``lowmem.tensors`` slots, so bitsandbytes layers from ``quantize_teacher``
(their int8 matrix and scales, their nf4 quant state) go back and forth unchanged: an offloaded
quantized teacher computes exactly what the resident one does. Quantize first, then offload.

Without CUDA the same code runs with no stream: the "device copy" is a real copy on the CPU, so
tests exercise staging, swapping, freeing and the residency counter, and the output is
bit-identical to the resident teacher's. Inference only: teachers run under ``no_grad``; under
autograd the saved weights would keep every block's copy alive until backward. An offloaded
teacher is not deep-copied or pickled (refused), nor moved with ``.to()`` (blocks would come back
to their CPU copies at the next forward): ``disable_offload`` first.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from .tensors import Slot, bnb_kind, group_slots, tensor_bytes, tensor_key, tensor_slots

BlockList = List[Tuple[str, nn.Module]]


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _holds_own_tensors(module: nn.Module) -> bool:
    return any(t is not None for t in list(module._parameters.values()) + list(module._buffers.values()))


def _callable(module: nn.Module) -> bool:
    """Has a forward of its own (nn.ModuleList / nn.ModuleDict do not: they are never called)."""
    return type(module).forward is not nn.Module.forward


def find_blocks(module: nn.Module, path: Optional[str] = None) -> Tuple[str, BlockList]:
    """The block list to offload: ``(container name, [(block name, block), ...])``.

    With ``path`` (e.g. ``"net.blocks"``) that container; otherwise the ``nn.Sequential`` or
    ``nn.ModuleList`` whose children hold the most bytes (ties: more children). Children without
    tensors (activations, dropout) are not blocks: they need no copy.
    """
    if path is not None:
        try:
            container = module.get_submodule(path)
        except AttributeError as exc:
            raise ValueError(f"blocks={path!r}: no such submodule ({exc})") from None
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            raise ValueError(f"blocks={path!r} is a {type(container).__name__}, not an nn.Sequential or nn.ModuleList")
        name = path
    else:
        best, best_score = None, None
        for cname, m in module.named_modules():
            if not isinstance(m, (nn.Sequential, nn.ModuleList)):
                continue
            kids = [c for c in m.children() if _holds_tensors(c)]
            if len(kids) < 2:
                continue
            score = (sum(tensor_bytes(c) for c in kids), len(kids))
            if best_score is None or score > best_score:
                best, best_score = (cname, m), score
        if best is None:
            raise ValueError(f"{type(module).__name__} has no nn.Sequential/nn.ModuleList with two or more blocks "
                             "holding weights; pass blocks='attribute.path' to enable_offload")
        name, container = best
    blocks = [(f"{name}.{n}" if name else n, c) for n, c in container.named_children() if _holds_tensors(c)]
    if len(blocks) < 2:
        raise ValueError(f"{name or 'the module'} has {len(blocks)} block(s) holding weights: nothing to offload")
    return name, blocks


def _hook_targets(name: str, block: nn.Module) -> List[nn.Module]:
    """Where a block's hooks go: the block itself, or, for a bare container (HED's ModuleList of
    convs, never called itself), each of its layers: the first one called brings the block in, and
    the next block's first layer (or the end of the teacher's forward) frees it."""
    if _callable(block):
        return [block]
    layers = [sub for sub in block.modules() if _callable(sub) and _holds_own_tensors(sub)]
    if not layers:
        raise ValueError(f"block {name} ({type(block).__name__}) has no callable layer to hook")
    return layers


@dataclass
class OffloadStats:
    n_blocks: int
    block_bytes: List[int]  # weight bytes of each block (what one copy moves)
    resident_bytes: int  # bytes kept on the device for good (everything outside the block list)
    resident: int = 0  # blocks with a device copy now
    max_resident: int = 0  # most blocks with a device copy at once, since the last reset
    max_resident_block_bytes: int = 0  # most block bytes on the device at once
    loads: int = 0  # block copies started
    bytes_copied: int = 0


@dataclass(eq=False)
class _Block:
    index: int
    name: str
    module: nn.Module
    entries: List[Tuple[torch.Tensor, List[Slot]]]  # (CPU home tensor, slots that hold it)
    transients: List[Tuple[object, str]] = field(default_factory=list)  # per-forward state to drop
    nbytes: int = 0
    staged: Optional[List[torch.Tensor]] = None
    event: Optional[object] = None
    active: bool = False


class BlockOffloader:
    """The hooks and bookkeeping of one offloaded teacher; built by :func:`enable_offload`."""

    def __init__(self, root: nn.Module, blocks: BlockList, device: Union[str, torch.device],
                 pin_memory: Optional[bool] = None, container: str = ""):
        self.root, self.container = root, container
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        cuda = self.device.type == "cuda"
        self.pin_memory = cuda if pin_memory is None else bool(pin_memory)
        if self.pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA")
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        hook_targets = [_hook_targets(name, m) for name, m in blocks]  # validate before moving anything

        # Which tensors belong to exactly one block: those move; anything shared stays resident.
        owners = {}
        for i, (_, m) in enumerate(blocks):
            for t, _ in group_slots(tensor_slots(m)):
                owners.setdefault(tensor_key(t), set()).add(i)
        block_keys = {k for k, s in owners.items() if len(s) == 1}
        per_block: List[List[Tuple[torch.Tensor, List[Slot]]]] = [[] for _ in blocks]
        resident = []
        for t, slots in group_slots(tensor_slots(root)):
            k = tensor_key(t)
            if k in block_keys:
                per_block[next(iter(owners[k]))].append((t, slots))
            else:
                resident.append((t, slots))
        for t, slots in resident:  # everything outside the block list: on the device for good
            if t.device != self.device:
                moved = t.to(self.device)
                for s in slots:
                    s.set(moved)
        self.blocks: List[_Block] = []
        for i, ((name, m), entries) in enumerate(zip(blocks, per_block)):
            homes = []
            for t, slots in entries:
                home = t.detach().to("cpu")
                if self.pin_memory:
                    home = home.pin_memory()
                for s in slots:
                    s.set(home)
                homes.append((home, slots))
            transients = [(mod.state, "idx") for mod in m.modules() if bnb_kind(mod) == "int8"]
            self.blocks.append(_Block(i, name, m, homes, transients,
                                      nbytes=sum(h.numel() * h.element_size() for h, _ in homes)))
        self.stats = OffloadStats(n_blocks=len(self.blocks), block_bytes=[b.nbytes for b in self.blocks],
                                  resident_bytes=sum(t.numel() * t.element_size() for t, _ in resident))
        self._handles = [root.register_forward_pre_hook(self._root_pre), root.register_forward_hook(self._root_post)]
        for b, targets in zip(self.blocks, hook_targets):
            self._handles += [t.register_forward_pre_hook(self._block_pre(b)) for t in targets]
            if _callable(b.module):  # a called block frees itself when done
                self._handles.append(b.module.register_forward_hook(self._block_post(b)))

    # ---------------------------------------------------------------------- moving
    def _copy_context(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _stage(self, b: _Block) -> None:
        """Start copying block ``b`` to the device (side stream on CUDA; a plain copy on CPU)."""
        if b.staged is not None:
            return
        with self._copy_context():
            b.staged = [home.to(self.device, non_blocking=True, copy=True) for home, _ in b.entries]
            if self.stream is not None:
                b.event = torch.cuda.Event()
                b.event.record(self.stream)
        s = self.stats
        s.loads += 1
        s.bytes_copied += b.nbytes
        s.resident += 1
        s.max_resident = max(s.max_resident, s.resident)
        on_device = sum(x.nbytes for x in self.blocks if x.staged is not None)
        s.max_resident_block_bytes = max(s.max_resident_block_bytes, on_device)

    def _activate(self, b: _Block) -> None:
        if b.active:
            return
        for other in self.blocks:  # blocks run one after the other: an active one is done
            if other.active:
                self._release(other)
        self._stage(b)
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(b.event)
            for t in b.staged:
                t.record_stream(current)  # the allocator must not reuse it before the compute stream is done
        for t, (_, slots) in zip(b.staged, b.entries):
            for s in slots:
                s.set(t)
        b.active = True

    def _release(self, b: _Block) -> None:
        if b.staged is None:
            return
        for home, slots in b.entries:
            for s in slots:
                s.set(home)
        for obj, attr in b.transients:
            setattr(obj, attr, None)
        b.staged, b.event, b.active = None, None, False
        self.stats.resident -= 1

    def _release_all(self) -> None:
        for b in self.blocks:
            self._release(b)

    # ---------------------------------------------------------------------- hooks
    def _root_pre(self, module, args):
        self._release_all()  # leftovers of a forward that raised
        self._stage(self.blocks[0])

    def _root_post(self, module, args, output):
        self._release_all()

    def _block_pre(self, b: _Block):
        def hook(module, args):
            self._activate(b)
            if b.index + 1 < len(self.blocks):
                self._stage(self.blocks[b.index + 1])
        return hook

    def _block_post(self, b: _Block):
        def hook(module, args, output):
            self._release(b)
        return hook

    def __deepcopy__(self, memo):
        raise TypeError("an offloaded teacher cannot be deep-copied (its hooks belong to this one): "
                        "call disable_offload(teacher) first, or copy the teacher before enable_offload")

    def __getstate__(self):
        raise TypeError("an offloaded teacher cannot be pickled: call disable_offload(teacher) first")

    # ---------------------------------------------------------------------- public
    def reset_stats(self) -> None:
        s = self.stats
        s.max_resident, s.max_resident_block_bytes, s.loads, s.bytes_copied = s.resident, 0, 0, 0

    def remove(self) -> nn.Module:
        """Undo: remove the hooks and put every block on the device for good; returns the teacher."""
        self._release_all()
        for h in self._handles:
            h.remove()
        self._handles = []
        for b in self.blocks:
            for home, slots in b.entries:
                moved = home.to(self.device, copy=True)
                for s in slots:
                    s.set(moved)
        if getattr(self.root, "lowmem_offload", None) is self:
            del self.root.lowmem_offload
        return self.root


def enable_offload(teacher: nn.Module, device: Union[str, torch.device], blocks: Optional[str] = None,
                   pin_memory: Optional[bool] = None) -> BlockOffloader:
    """Offload ``teacher``'s block list to CPU memory; everything else moves to ``device``.

    ``blocks``: attribute path of the block list (default: found, see :func:`find_blocks`).
    ``pin_memory``: default True on CUDA (needed for copies that overlap compute). The teacher
    keeps its type and is called as before, with inputs on ``device``; the returned
    :class:`BlockOffloader` (also ``teacher.lowmem_offload``) holds the stats and ``remove()``.

    Example::

        quantize_teacher(teacher, bits=4, device="cuda")   # optional: quantize first
        off = enable_offload(teacher, "cuda")
        feats = teacher(images.cuda())
        print(off.stats.max_resident)                      # 2
    """
    if getattr(teacher, "lowmem_offload", None) is not None:
        raise ValueError("offload is already enabled on this teacher (teacher.lowmem_offload.remove() undoes it)")
    teacher.eval()
    container, block_list = find_blocks(teacher, blocks)
    off = BlockOffloader(teacher, block_list, device, pin_memory, container)
    teacher.lowmem_offload = off
    return off


def disable_offload(teacher: nn.Module) -> nn.Module:
    """Put an offloaded teacher's blocks back on its device for good (no-op when not offloaded)."""
    off = getattr(teacher, "lowmem_offload", None)
    return off.remove() if off is not None else teacher



