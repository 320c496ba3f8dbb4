"""Activation bytes measured on the meta device equal what a real CPU forward keeps."""
import dataclasses

import pytest
import torch

from lowres_kd.model import Student
from lowres_kd.planner.memtrack import LiveBytes, emulate_device
from lowres_kd.teachers import build_teacher
from lowres_kd.build import student_backbone_config


def saved_bytes_cpu(module, images) -> int:
    """Independent count: unique storages autograd saves in a real CPU forward, plus the outputs
    (parameters, buffers and the input are not activations)."""
    own = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers()) + [images]}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(images)
    for t in out:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values()), out



def kept_bytes_meta_with_outputs(module, images) -> int:
    live = LiveBytes()
    with live, emulate_device():
        out = module(images)
        kept = live.current
    assert out is not None
    return kept


def student(recipe, device, checkpointing=False):
    cfg = dataclasses.replace(student_backbone_config(recipe, with_weights=False), weights="none")
    with torch.device(device):
        body = build_teacher(cfg)
        s = Student(body, dataclasses.replace(recipe.student, grad_checkpointing=checkpointing))
    return s.train()


STUDENTS = {
    "mobilenet_v2 adapter (LoRA)": {},
    "timm vit_tiny full": {"teachers": [{"name": "vit", "family": "timm", "model": "vit_tiny_patch16_224",
                                         "weights": "none", "input_size": 64, "base": True}],
                           "student": {"mode": "full"}},
}


@pytest.mark.parametrize("which", list(STUDENTS))
def test_meta_activation_bytes_equal_a_real_cpu_forward(tiny_recipe, which):
    recipe = tiny_recipe(**STUDENTS[which])
    real, _ = saved_bytes_cpu(student(recipe, "cpu"), torch.rand(3, 3, 64, 64))
    meta = kept_bytes_meta_with_outputs(student(recipe, "meta"), torch.empty(3, 3, 64, 64, device="meta"))
    assert real > 0
    assert meta == real


@pytest.mark.parametrize("which", list(STUDENTS))
def test_checkpointing_keeps_less_and_meta_agrees_with_cpu(tiny_recipe, which):
    recipe = tiny_recipe(**STUDENTS[which])
    plain = kept_bytes_meta_with_outputs(student(recipe, "meta"), torch.empty(3, 3, 64, 64, device="meta"))
    ckpt = kept_bytes_meta_with_outputs(student(recipe, "meta", True), torch.empty(3, 3, 64, 64, device="meta"))
    assert 0 < ckpt < 0.5 * plain
    # the same count on real tensors (checkpointed segments keep their inputs through a closure,
    # not as saved tensors: the planner counts live storages, whoever holds them)
    cpu_student, images, live = student(recipe, "cpu", True), torch.rand(3, 3, 64, 64), LiveBytes()
    with live, emulate_device():
        out = cpu_student(images)
        real = live.current
    assert out is not None and real == ckpt


def test_fused_kernel_on_meta_keeps_what_it_keeps_on_cpu():
    """The planner runs the fused op's own host code on meta (launches skipped): it holds the same
    bytes, at every point that LiveBytes sees, as the op run for real (interpreted on CPU)."""
    from lowres_kd_kernels import triton_usable

    if not triton_usable()[0]:
        pytest.skip(triton_usable()[1])
    from lowres_kd_kernels.linear_distill import fused_linear_distill_triton

    n, k, c = 300, 32, 48

    import gc

    def run(device, **kw):
        hidden = torch.randn(n, k, device=device, requires_grad=True)
        weight = torch.randn(c, k, device=device, requires_grad=True)
        bias = torch.randn(c, device=device, requires_grad=True)
        target = torch.randn(n, c, device=device)
        live = LiveBytes()
        with live:
            loss = fused_linear_distill_triton(hidden, weight, bias, target, **kw)
            gc.collect()  # Triton's interpreter holds the last launch's arguments in a reference cycle
            kept, fwd_peak = live.current, live.peak
            loss.backward()
        return kept, fwd_peak, live.peak

    for kw in ({}, {"chunk_rows": 128}):  # one chunk (the default here), three chunks
        real, meta = run("cpu", **kw), run("meta", **kw)
        assert meta[0] == real[0], kw
        # the interpreter keeps its last launch's arguments (a row chunk) alive until gc runs, so
        # the CPU peaks may exceed the GPU's (= meta's) by one chunk, never by more
        chunk = min(kw.get("chunk_rows", n), n) * c * 4
        for m, r in zip(meta[1:], real[1:]):
            assert m <= r <= m + chunk, kw
        assert real[0] >= (n * k + c * k + c) * 4  # dH, dW, db kept from forward to backward
