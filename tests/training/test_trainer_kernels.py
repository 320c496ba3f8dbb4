"""The trainer with ``loss.kernels: triton`` on CPU (the kernels interpreted) gives the losses of
the PyTorch reference: the fused op inside the real loop, through the heads' module wrapper.
(AdamW's updates hardly depend on a gradient's overall scale, so a wrong constant factor in the
gradients would not show here; the kernel tests compare every gradient with the reference.)"""
import os

import pytest

from helpers import logged_losses, train_to_end


def _losses(recipe):
    return logged_losses(train_to_end(recipe).recipe.run_dir)


def test_triton_kernels_in_the_training_loop_match_the_reference(tiny_recipe, tmp_path, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU interpreter off; tests/training/test_trainer_gpu.py covers CUDA")
    from lowres_kd_kernels import linear_distill

    calls = []
    real = linear_distill.fused_linear_distill_triton
    monkeypatch.setattr(linear_distill, "fused_linear_distill_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = dict(train={"steps": 3, "checkpoint_every": 100})
    triton_run = _losses(tiny_recipe(output_dir=str(tmp_path / "triton"), loss={"kernels": "triton"}, **common))
    assert len(calls) == 3 * 3 * 2  # steps x teachers x (global, dense): the kernel really ran
    torch_run = _losses(tiny_recipe(output_dir=str(tmp_path / "torch"), loss={"kernels": "torch"}, **common))
    assert len(triton_run) == len(torch_run) == 3
    assert triton_run == pytest.approx(torch_run, rel=1e-4)
