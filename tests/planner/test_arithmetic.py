"""The planner's byte formulas against numbers worked out by hand (and bitsandbytes' real layouts)."""

import pytest
import torch
from torch import nn

from lowres_kd.planner.arithmetic import EngineSettings, adamw8bit_bytes, engine_state, linear_bytes, teacher_weight_bytes
from lowres_kd.planner.profile import teacher_weights

MiB = 2**20


def test_linear_bytes_by_hand():
    # Linear(256 -> 384) with bias
    assert linear_bytes(384, 256, True, 16, 2) == 2 * (384 * 256 + 384)  # bf16
    assert linear_bytes(384, 256, True, 16, 4) == 4 * (384 * 256 + 384)  # fp32
    # int8: 98304 weights + 384 fp32 row scales + 384 bias at the teacher dtype (fp32)
    assert linear_bytes(384, 256, True, 8, 4) == 98304 + 1536 + 1536
    # nf4: 49152 packed bytes, 1536 uint8 absmax, ceil(1536/256)=6 fp32 nested absmax, 16 + 256 fp32 codes,
    # one fp32 offset, 384 bf16 bias
    assert linear_bytes(384, 256, True, 4, 4) == 49152 + 1536 + 24 + 64 + 1024 + 4 + 768
    # odd sizes: 100 x 70 = 7000 weights, ceil(7000/64) = 110 blocks, one nested block
    assert linear_bytes(100, 70, False, 4, 2) == 3500 + 110 + 4 + 64 + 1024 + 4


@pytest.mark.parametrize("bits", [8, 4])
def test_linear_bytes_match_bitsandbytes(bits):
    """The formula equals what quantize_teacher really holds (CPU bitsandbytes)."""
    pytest.importorskip("bitsandbytes")
    from lowres_kd.lowmem import quantize_teacher

    for out_f, in_f in ((384, 256), (100, 70), (1000, 130)):
        report = quantize_teacher(nn.Sequential(nn.Linear(in_f, out_f)), bits, device="cpu")
        assert report.quantized_bytes_after == linear_bytes(out_f, in_f, True, bits, 4)


def test_teacher_bytes_of_a_tiny_module_and_offload():
    """A stem, a block list of three blocks (Linear + LayerNorm each) and a head, counted by hand."""
    net = nn.Module()
    net.stem = nn.Conv2d(3, 8, 3)  # 8*3*3*3 + 8 = 224 floats
    net.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32)) for _ in range(3)])
    net.head = nn.Linear(32, 10)  # 330
    outside, blocks = teacher_weights(net)
    assert len(blocks) == 3
    per_block_fp32 = 4 * (16 * 32 + 32 + 2 * 32)  # 2432 bytes
    outside_fp32 = 4 * (224 + 330)
    assert outside.nbytes(16, 4) == outside_fp32
    assert [b.nbytes(16, 4) for b in blocks] == [per_block_fp32] * 3
    assert teacher_weight_bytes(outside, blocks, 16, 4, offload=False) == (outside_fp32 + 3 * per_block_fp32, 0)
    # offloaded: outside + the two blocks staged at once stay; the three blocks live in CPU memory
    assert teacher_weight_bytes(outside, blocks, 16, 4, offload=True) == (outside_fp32 + 2 * per_block_fp32,
                                                                          3 * per_block_fp32)
    # int8, bf16 for the rest: block = 512 int8 + 32 fp32 scales + 32 bf16 bias + 64 bf16 LayerNorm
    block_int8 = 512 + 128 + 64 + 128
    outside_int8 = 2 * 224 + (320 + 40 + 20)  # the conv in bf16, the head Linear at int8
    assert teacher_weight_bytes(outside, blocks, 8, 2, offload=True) == (outside_int8 + 2 * block_int8, 3 * block_int8)


def test_offload_picks_the_same_blocks_on_meta():
    """The planner builds teachers on meta, where no tensor has memory: lowmem.find_blocks must
    still choose the container it chooses on CPU-built teachers."""
    from lowres_kd.config import TeacherConfig
    from lowres_kd.lowmem import find_blocks
    from lowres_kd.teachers import build_teacher

    for cfg in (TeacherConfig("a", "mobilenet_v2", weights="none", input_size=64),
                TeacherConfig("b", "efficientnet_lite0", weights="none", input_size=64),
                TeacherConfig("c", "hed", weights="none", input_size=64),
                TeacherConfig("d", "timm", model="vit_tiny_patch16_224", weights="none", input_size=64)):
        name, blocks = find_blocks(build_teacher(cfg))
        with torch.device("meta"):
            meta_teacher = build_teacher(cfg)
        meta_name, meta_blocks = find_blocks(meta_teacher)
        assert (meta_name, [n for n, _ in meta_blocks]) == (name, [n for n, _ in blocks]), cfg.family


def test_adamw8bit_bytes_by_hand():
    # 100 elements: fp32 moments (800 bytes); 5000: 2 x 5000 uint8 + 2 x ceil(5000/256)=20 fp32 absmax; the
    # two shared 256-entry fp32 quantization maps once
    assert adamw8bit_bytes([100, 5000]) == 800 + 10000 + 160 + 2048
    assert adamw8bit_bytes([100]) == 800


P, F = 1000, 5000  # trainable (two tensors: 600 + 400), frozen
SIZES = [600, 400]


def state(engine, **kw):
    rows = engine_state(SIZES, F, largest_layer=600, s=EngineSettings(engine=engine, bf16=kw.pop("bf16", True), **kw))
    return {k: v[:2] for k, v in rows.items()}


def test_torch_engine_by_hand():
    assert state("torch") == {"params": (4000, 0), "frozen": (20000, 0), "grads": (4000, 0), "optimizer": (8000, 0),
                              "buffers": (0, 0)}
    # two ranks: nothing partitioned, one flat fp32 copy of the gradients for the all-reduce
    assert state("torch", world_size=2)["buffers"] == (4000, 0)
    # 8-bit AdamW: both tensors under 4096 elements keep fp32 moments
    assert state("torch", optim_name="adamw8bit")["optimizer"] == (8000, 0)


@pytest.mark.parametrize("stage, world, expected", [
    # stage 0/1, bf16, one rank: bf16 params/grads + fp32 grad accumulation (BF16_Optimizer), 12 B/param state
    (0, 1, {"params": (2000, 0), "frozen": (10000, 0), "grads": (2000 + 4000, 0), "optimizer": (12000, 0), "buffers": (0, 0)}),
    (1, 4, {"params": (2000, 0), "frozen": (10000, 0), "grads": (6000, 0), "optimizer": (3000, 0), "buffers": (0, 0)}),
    # stage 2, 4 ranks: gradients partitioned too; a bf16 reduction bucket of 100 elements
    (2, 4, {"params": (2000, 0), "frozen": (10000, 0), "grads": (500, 0), "optimizer": (3000, 0), "buffers": (200, 0)}),
    # stage 3, 4 ranks: parameters (frozen ones too) partitioned; + gathered set min(6000, 50 + 600) in bf16
    (3, 4, {"params": (500, 0), "frozen": (2500, 0), "grads": (500, 0), "optimizer": (3000, 0), "buffers": (200 + 1300, 0)}),
])
def test_deepspeed_stages_by_hand(stage, world, expected):
    assert state("deepspeed", zero_stage=stage, world_size=world, reduce_bucket=100, prefetch_bucket=50) == expected


def test_deepspeed_offload_by_hand():
    # stage 2, 2 ranks, optimizer offload: 12 B/param / 2 and the fp32 gradient partition (4 B / 2) in CPU memory
    s = state("deepspeed", zero_stage=2, world_size=2, offload_optimizer=True, reduce_bucket=100)
    assert s == {"params": (2000, 0), "frozen": (10000, 0), "grads": (1000, 2000), "optimizer": (0, 6000),
                 "buffers": (200, 0)}
    # stage 3 + parameter offload, one rank: parameters in CPU memory, min(6000, 50 + 600) gathered in bf16
    s = state("deepspeed", zero_stage=3, world_size=1, offload_optimizer=True, offload_param=True, reduce_bucket=100,
              prefetch_bucket=50)
    assert s["params"] == (1300, 2000) and s["frozen"] == (0, 10000) and s["optimizer"] == (0, 12000)
    # overlap_comm doubles the bucket; without bf16: fp32 everything, no master copy
    assert state("deepspeed", zero_stage=2, reduce_bucket=100, overlap_comm=True)["buffers"] == (400, 0)
    assert state("deepspeed", bf16=False, zero_stage=2, reduce_bucket=100) == {
        "params": (4000, 0), "frozen": (20000, 0), "grads": (4000, 0), "optimizer": (8000, 0), "buffers": (400, 0)}
