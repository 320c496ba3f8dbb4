"""Quantized teachers with real bitsandbytes on CPU: fidelity, byte arithmetic, shipped teachers, errors."""
import copy
import importlib.util

import pytest
import timm
import torch
from safetensors.torch import save_file
from skimage import data as skdata
from torch import nn

from lowres_kd.config import TeacherConfig
from lowres_kd.data import EvalTransform
from lowres_kd.lowmem import (FidelityError, FidelityReport, check_fidelity, quantize_teacher, teacher_fidelity,
                              tensor_bytes)
from lowres_kd.teachers import TEACHERS, Features, build_teacher, is_graph_teacher, small_random_config

# The quantization tests need bitsandbytes (a CPU-capable build); without it they are skipped, saying so.
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")

VIT = "vit_tiny_patch16_224"
SIZE = 64
# Measured on random-weight ViT-Ti/S at 64 px (3 seeds, photos + noise): int8 cos >= 0.9995 global,
# >= 0.9997 dense; nf4 cos 0.969-0.973 global, 0.983-0.993 dense. Thresholds keep a margin.
MIN_COS = {8: 0.99, 4: 0.95}
MAX_RATIO = {8: 0.30, 4: 0.18}  # ViT-Ti: measured 0.279 and 0.158 (its patch embedding is a larger share than ViT-S's)


def photos(size=SIZE, names=("astronaut", "chelsea", "coffee", "rocket")) -> torch.Tensor:
    return torch.cat([EvalTransform(size)(getattr(skdata, n)())[None] for n in names])


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """A random-weight ViT-Ti saved as a local safetensors checkpoint (loaded like real weights)."""
    torch.manual_seed(0)
    net = timm.create_model(VIT, num_classes=0, img_size=SIZE)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors"
    save_file(net.state_dict(), str(path))
    return str(path)


def vit_teacher(path):
    return build_teacher(TeacherConfig(name="vit", family="timm", model=VIT, weights=path, input_size=SIZE)).freeze()


@needs_bnb
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_vit_features_stay_close(vit_file, bits):
    ref = vit_teacher(vit_file)
    q = vit_teacher(vit_file)
    report = quantize_teacher(q, bits)
    assert report.n_quantized == 48 and not report.skipped  # 12 blocks x (qkv, proj, fc1, fc2)
    assert report.ratio <= MAX_RATIO[bits]
    assert report.bytes_before == tensor_bytes(ref)
    assert report.unquantized_by_type.keys() >= {"Conv2d", "LayerNorm"}
    assert report.compute_dtype == ("bfloat16" if bits == 4 else None)
    images = torch.cat([photos(), torch.rand(4, 3, SIZE, SIZE)])
    fid = teacher_fidelity(ref, q, images)
    assert fid.images == 8 and not fid.normalised
    assert fid.cos_global >= MIN_COS[bits] and fid.cos_dense >= MIN_COS[bits], fid
    assert fid.rel_err_dense < (0.05 if bits == 8 else 0.3)
    check_fidelity(fid, MIN_COS[bits], "vit", bits)  # does not raise
    assert not any(p.requires_grad for p in q.parameters()) and not q.training


def _tiny():
    return nn.Sequential(nn.Linear(64, 32))


@needs_bnb
def test_byte_report_matches_hand_computation_int8():
    m = _tiny()
    r = quantize_teacher(m, 8)
    fp32 = 64 * 32 * 4 + 32 * 4
    int8 = 64 * 32 + 32 * 4 + 32 * 4  # int8 weights + one fp32 scale per output row + fp32 bias
    assert (r.bytes_before, r.bytes_after) == (fp32, int8)
    assert (r.quantized_bytes_before, r.quantized_bytes_after, r.unquantized_bytes) == (fp32, int8, 0)
    assert r.n_quantized == 1 and r.quantized_names == ["0"] and r.unquantized_modules == 0
    assert type(m[0]).__name__ == "Linear8bitLt" and m[0].weight.dtype == torch.int8


@needs_bnb
def test_byte_report_matches_hand_computation_nf4():
    m = _tiny()
    r = quantize_teacher(m, 4)
    blocks = 64 * 32 // 64  # 32 blocks of 64 weights
    nf4 = (64 * 32 // 2  # two 4-bit codes a byte
           + blocks * 1  # block absmax, itself quantized to uint8 (double quant)
           + 16 * 4  # the nf4 code book (16 fp32 values)
           + 4  # offset subtracted before quantizing the absmax (fp32 scalar)
           + 1 * 4 + 256 * 4  # nested statistics: one fp32 absmax per 256 blocks + the 8-bit code book
           + 32 * 2)  # bias, cast to the bf16 compute dtype
    assert (r.bytes_before, r.bytes_after) == (64 * 32 * 4 + 32 * 4, nf4)
    assert r.unquantized_bytes == 0 and r.n_quantized == 1


@needs_bnb
def test_byte_report_counts_what_stays():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.LayerNorm(32))
    x = torch.rand(2, 3, 8, 8)
    r = quantize_teacher(m, 8)
    conv, ln = (8 * 3 * 3 * 3 + 8) * 4, 2 * 32 * 4
    lin_fp32, lin_int8 = (288 * 32 + 32) * 4, 288 * 32 + 32 * 4 + 32 * 4
    assert r.unquantized_bytes == conv + ln and r.unquantized_modules == 2
    assert r.unquantized_by_type == {"Conv2d": conv, "LayerNorm": ln}
    assert r.bytes_before == conv + ln + lin_fp32 and r.bytes_after == conv + ln + lin_int8
    assert r.ratio == pytest.approx(r.bytes_after / r.bytes_before)
    assert "1 linear layers quantized" in r.summary() and "Conv2d" in r.summary()
    with torch.no_grad():
        assert m(x).shape == (2, 32)


def test_bits16_is_a_no_op():
    m = _tiny()
    w = m[0].weight.clone()
    r = quantize_teacher(m, 16)
    assert type(m[0]) is nn.Linear and torch.equal(m[0].weight, w)
    assert r.bytes_before == r.bytes_after and r.n_quantized == 0 and r.ratio == 1.0


@needs_bnb
def test_refusals_and_what_is_left_alone():
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_teacher(_tiny(), 3)
    with pytest.raises(ValueError, match="wrap a bare nn.Linear"):
        quantize_teacher(nn.Linear(4, 4), 8)
    m = _tiny()
    quantize_teacher(m, 8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_teacher(m, 4)

    class WithAttention(nn.Module):  # MultiheadAttention reads out_proj.weight itself
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 10)
            self.classifier = nn.Linear(32, 5)

        def forward(self, x):
            y = self.attn(x, x, x, need_weights=False)[0]
            return self.head(y), self.classifier(y)

    m = WithAttention()
    x = torch.rand(2, 5, 32)
    r = quantize_teacher(m, 4, exclude=["classifier"])
    assert r.quantized_names == ["head"]
    assert "subclass of nn.Linear" in r.skipped["attn.out_proj"] and r.skipped["classifier"] == "excluded by pattern"
    with torch.no_grad():
        assert m(x)[0].shape == (2, 5, 10)


@pytest.fixture(scope="module")
def shipped():
    """The real shipped CNN teachers, built once (tests quantize copies)."""
    return {f: build_teacher(TeacherConfig(name="t", family=f, input_size=SIZE)).freeze()
            for f in ("mobilenet_v2", "efficientnet_lite0")}


@needs_bnb
@pytest.mark.parametrize("family,name,bits", [("mobilenet_v2", "net.classifier.1", 8), ("mobilenet_v2", "net.classifier.1", 4),
                                              ("efficientnet_lite0", "net._fc", 4)])
def test_shipped_cnn_teachers_are_mostly_convolutions(shipped, family, name, bits):
    """One linear (the ImageNet classifier) per shipped CNN: the report shows the convs staying."""
    ref = shipped[family]
    q = copy.deepcopy(ref)
    r = quantize_teacher(q, bits)
    assert r.quantized_names == [name] and r.n_quantized == 1 and not r.skipped
    conv_bytes = sum(v for k, v in r.unquantized_by_type.items() if "Conv" in k)  # effnet: Conv2dStaticSamePadding
    assert conv_bytes > r.quantized_bytes_after
    assert r.unquantized_fraction > 0.5 and r.ratio > 0.6  # honest: most bytes are convolutions
    assert r.quantized_bytes_before == 1280 * 1000 * 4 + 1000 * 4
    fid = teacher_fidelity(ref, q, photos(names=("chelsea", "coffee")))
    assert fid.cos_global == pytest.approx(1.0) and fid.rel_err_dense == 0.0  # the classifier is not a feature layer
    cat = photos(names=("chelsea",))
    with torch.no_grad():
        logits, expected = q.classify(cat).float(), ref.classify(cat)
    assert torch.nn.functional.cosine_similarity(logits, expected).item() > 0.99
    # int8 keeps the top-1; nf4 may swap close classes (effnet at 64 px: 285 Egyptian cat -> 282 tiger cat)
    assert int(expected.argmax()) in logits.topk(1 if bits == 8 else 3).indices.tolist()[0]


@needs_bnb
@pytest.mark.parametrize("family", TEACHERS.list())
def test_every_registered_family_can_be_quantized(family):
    if is_graph_teacher(family):
        pytest.skip(f"{family} runs outside torch: nothing to quantize (recipes refuse bits on it)")
    t = build_teacher(small_random_config(family)).freeze()
    linears = sum(type(m) is nn.Linear for m in t.modules())
    images = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        ref = t(images)
    r = quantize_teacher(t, 4)
    assert r.n_quantized == linears and r.bytes_after <= r.bytes_before
    with torch.no_grad():
        out = t(images)
    assert out.global_.shape == ref.global_.shape and out.dense.shape == ref.dense.shape
    assert torch.isfinite(out.dense).all()


def test_fidelity_metrics_by_hand():
    b = Features(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(1, 2, 1, 2))
    a = Features(torch.tensor([[1.0, 1.0], [0.0, 2.0]]), torch.tensor([[[[1.0, -1.0]], [[1.0, 1.0]]]]))
    r = teacher_fidelity(b, a)
    assert r.cos_global == pytest.approx((2**-0.5 + 1.0) / 2)
    assert r.cos_dense == pytest.approx((1.0 + 0.0) / 2)  # token 0: (1,1)vs(1,1); token 1: (-1,1)vs(1,1)
    assert r.rel_err_global == pytest.approx(1.0 / 5**0.5)
    assert r.rel_err_dense == pytest.approx(2.0 / 2.0)
    shift = (lambda g: g - 1.0, lambda d: d - 1.0)
    rn = teacher_fidelity(b, b, normalisers=shift)
    assert rn.normalised and rn.rel_err_global == 0.0

    class Centre(nn.Module):  # a normaliser module with a buffer (applied on its device, in fp32)
        def __init__(self, mean):
            super().__init__()
            self.register_buffer("mean", mean)

        def forward(self, x):
            return x - self.mean.view(1, -1, *([1] * (x.dim() - 2)))

    half = Features(a.global_.bfloat16(), a.dense.bfloat16())
    rm = teacher_fidelity(b, half, normalisers=(Centre(torch.tensor([1.0, 0.0])), Centre(torch.tensor([1.0, 1.0]))))
    assert rm.cos_global == pytest.approx(0.5)  # rows (0,1)vs(0,0) -> 0 and (-1,2)vs(-1,2) -> 1
    assert rm.rel_err_dense == float("inf")  # the centred reference is all zeros
    with pytest.raises(ValueError, match="needs images"):
        teacher_fidelity(nn.Identity(), a)


def test_fidelity_error_names_teacher_cosine_threshold_and_next_bits():
    low = FidelityReport(cos_global=0.91, cos_dense=0.95, rel_err_global=0.4, rel_err_dense=0.3, images=16, normalised=True)
    with pytest.raises(FidelityError) as err:
        check_fidelity(low, 0.97, "dinov2", 4)
    msg = str(err.value)
    for part in ("'dinov2'", "4 bits", "0.9100", "min_fidelity=0.97", "try bits=8", "normalised"):
        assert part in msg, (part, msg)
    with pytest.raises(FidelityError, match="try bits=16"):
        check_fidelity(low, 0.97, "clip", 8)
    with pytest.raises(FidelityError, match="already at full precision"):
        check_fidelity(low, 0.97, "clip", 16)
    assert check_fidelity(low, 0.9, "clip", 4) is low
