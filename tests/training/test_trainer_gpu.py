"""The trainer on CUDA: bf16 autocast and the Triton kernels inside the real loop (gpu marker)."""
import pytest
import torch

from helpers import logged_losses, train_to_end

pytestmark = pytest.mark.gpu


def _losses(recipe):
    return logged_losses(train_to_end(recipe).recipe.run_dir)


def test_cuda_training_with_triton_kernels_matches_torch_reference(tiny_recipe, tmp_path):
    teachers = [{"name": "mobilenet", "family": "mobilenet_v2", "input_size": 96, "base": True},
                {"name": "effnet", "family": "efficientnet_lite0", "input_size": 96}]
    common = dict(teachers=teachers, data={"image_size": 96, "fashion_mnist": 0},
                  train={"steps": 12, "batch_size": 8, "device": "cuda", "checkpoint_every": 100})
    triton_run = _losses(tiny_recipe(output_dir=str(tmp_path / "triton"), loss={"kernels": "triton"}, **common))
    torch_run = _losses(tiny_recipe(output_dir=str(tmp_path / "torch"), loss={"kernels": "torch"}, **common))
    assert all(map(torch.isfinite, map(torch.tensor, triton_run)))
    assert triton_run[0] == pytest.approx(torch_run[0], rel=2e-2)  # same first step, bf16 tolerance
    assert sum(triton_run[-3:]) < sum(triton_run[:3])
