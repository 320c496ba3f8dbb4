"""Block offloading on CPU (same code path, no stream): bit-identical output, two blocks at most, quantized too."""
import copy
import importlib.util

import pytest
import torch
from torch import nn

from lowres_kd.config import TeacherConfig
from lowres_kd.lowmem import (UnsupportedLayerError, disable_offload, enable_offload, find_blocks, module_device,
                              quantize_teacher, tensor_bytes)
from lowres_kd.teachers import build_teacher

# The quantization tests need bitsandbytes (a CPU-capable build); without it they are skipped, saying so.
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")

SIZE = 64


def teacher(family, **kw):
    return build_teacher(TeacherConfig(name="t", family=family, input_size=kw.pop("input_size", SIZE), **kw)).freeze()


def vit(model="vit_tiny_patch16_224"):
    return teacher("timm", model=model, weights="none")


def run(t, x):
    with torch.no_grad():
        return t(x)


def assert_same(a, b):
    assert torch.equal(a.global_, b.global_) and torch.equal(a.dense, b.dense)


def assert_blocks_run_on_copies(off):
    """While a block runs, its tensors are the staged copies, not the CPU home tensors."""
    seen = []

    def check(block):
        def hook(module, args):
            homes = {h.data_ptr() for h, _ in block.entries}
            live = {p.data_ptr() for p in module.parameters()}
            seen.append(not (homes & live))
        return hook

    callable_blocks = [b for b in off.blocks if type(b.module).forward is not nn.Module.forward]
    handles = [b.module.register_forward_pre_hook(check(b)) for b in callable_blocks]  # runs after the offload hook
    return seen, handles


@pytest.mark.parametrize("make", [lambda: vit(), lambda: vit("vit_small_patch16_224"), lambda: teacher("mobilenet_v2")],
                         ids=["vit_tiny", "vit_small", "mobilenet_v2_shipped"])
def test_offloaded_teacher_is_bit_identical_with_two_blocks_resident(make):
    ref = make()
    x = torch.rand(2, 3, SIZE, SIZE)
    expected = run(ref, x)
    t = copy.deepcopy(ref)
    off = enable_offload(t, "cpu")
    assert t.lowmem_offload is off and module_device(t) == torch.device("cpu")
    seen, handles = assert_blocks_run_on_copies(off)
    n = off.stats.n_blocks
    for _ in range(2):
        assert_same(run(t, x), expected)
    assert seen and all(seen) and len(seen) == 2 * n
    s = off.stats
    assert s.max_resident == 2 and s.resident == 0  # block i and the prefetched i+1; all freed after
    assert s.loads == 2 * n and s.bytes_copied == 2 * sum(s.block_bytes)
    assert max(s.block_bytes) <= s.max_resident_block_bytes <= 2 * max(s.block_bytes)
    assert s.resident_bytes + sum(s.block_bytes) == tensor_bytes(ref)
    for b in off.blocks:  # after the forward every block points at its CPU home tensors again
        for home, slots in b.entries:
            assert all(sl.get().data_ptr() == home.data_ptr() for sl in slots)
    for h in handles:
        h.remove()


def test_find_blocks_generic_and_explicit():
    assert find_blocks(vit())[0] == "net.blocks"
    assert find_blocks(teacher("mobilenet_v2", weights="none", input_size=32))[0] == "net.features"
    assert find_blocks(teacher("efficientnet_lite0", weights="none", input_size=32))[0] == "net._blocks"
    name, blocks = find_blocks(teacher("hed", weights="none", input_size=32))
    assert name == "blocks" and len(blocks) == 5
    t = vit()
    name, blocks = find_blocks(t, "net.blocks")
    assert len(blocks) == 12 and blocks[0][0] == "net.blocks.0"
    with pytest.raises(ValueError, match="no such submodule"):
        find_blocks(t, "net.nothing")
    with pytest.raises(ValueError, match="not an nn.Sequential"):
        find_blocks(t, "net.patch_embed")
    with pytest.raises(ValueError, match="blocks='attribute.path'"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_container_blocks_and_early_exit_are_freed():
    """HED's blocks are ModuleLists (never called): their layers bring them in; an early exit frees all."""
    hed = teacher("hed", weights="none", input_size=32)
    x = torch.rand(1, 3, 32, 32)
    expected = run(hed, x)
    off = enable_offload(hed, "cpu")
    assert_same(run(hed, x), expected)
    assert off.stats.loads == 5 and off.stats.max_resident == 2 and off.stats.resident == 0
    eff = teacher("efficientnet_lite0", weights="none", input_size=32, layer=3)  # returns after block 3
    expected = run(eff, x)
    off = enable_offload(eff, "cpu")
    assert_same(run(eff, x), expected)
    assert off.stats.loads == 5 and off.stats.resident == 0  # blocks 0..3 and the prefetched 4


@needs_bnb
@pytest.mark.parametrize("bits", [8, 4])
def test_offload_of_a_quantized_teacher(bits):
    """bitsandbytes layers move back and forth through their raw tensors: same output as resident."""
    t = vit()
    quantize_teacher(t, bits)
    x = torch.rand(2, 3, SIZE, SIZE)
    expected = run(t, x)
    off = enable_offload(t, "cpu")
    for _ in range(2):
        assert_same(run(t, x), expected)
    assert off.stats.max_resident == 2 and off.stats.resident == 0
    int8 = [m for m in t.modules() if type(m).__name__ == "Linear8bitLt"]
    assert all(m.state.idx is None for m in int8)  # per-forward outlier indices dropped with the block
    with pytest.raises(ValueError, match="quantize first, then offload"):
        quantize_teacher(t, 4)
    disable_offload(t)
    assert_same(run(t, x), expected)


@needs_bnb
def test_remove_and_refusals():
    t = vit()
    x = torch.rand(1, 3, SIZE, SIZE)
    expected = run(t, x)
    off = enable_offload(t, "cpu")
    with pytest.raises(ValueError, match="already enabled"):
        enable_offload(t, "cpu")
    with pytest.raises(TypeError, match="disable_offload"):
        copy.deepcopy(t)
    assert disable_offload(t) is t and not hasattr(t, "lowmem_offload")
    loads = off.stats.loads
    assert_same(run(t, x), expected)
    assert off.stats.loads == loads  # hooks gone
    assert disable_offload(t) is t  # no-op

    import bitsandbytes as bnb

    m = nn.Sequential(nn.Linear(8, 8), bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=True))
    with pytest.raises(UnsupportedLayerError, match="has_fp16_weights=True"):
        enable_offload(m, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [16, 4])
def test_cuda_peak_weight_memory_is_about_two_blocks(bits):
    """On the GPU: device weight memory = what is outside the blocks; the forward peaks near two blocks."""
    if bits != 16 and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs bitsandbytes")
    dev = torch.device("cuda")
    ref = vit("vit_small_patch16_224")
    x = torch.rand(1, 3, SIZE, SIZE, device=dev)
    resident = copy.deepcopy(ref)
    quantize_teacher(resident, bits, device=dev)
    expected = run(resident, x)
    t = copy.deepcopy(ref)
    quantize_teacher(t, bits, device=dev)
    del ref
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(dev)
    off = enable_offload(t, dev)
    torch.cuda.synchronize()
    assert all(home.is_pinned() for b in off.blocks for home, _ in b.entries)
    base = torch.cuda.memory_allocated(dev)
    assert base < before  # the blocks left the device
    out = run(t, x)  # warm-up (cuBLAS workspaces, allocator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    out = run(t, x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(dev) - base
    two_blocks = 2 * max(off.stats.block_bytes)
    assert peak <= two_blocks + 8 * 2**20, (peak, two_blocks)  # + activations of one 64-px image
    assert torch.allclose(out.dense, expected.dense) and off.stats.max_resident == 2
