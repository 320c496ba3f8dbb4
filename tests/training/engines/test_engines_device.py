"""Both engines on a real device through the trainer: DeepSpeed ZeRO-2 (optimizer on CPU) and
ZeRO-3 against the torch engine, with teachers a GPU machine has without extra weight packages
(the shipped MobileNetV2 base and a random-weight timm ViT). On CUDA the student runs in bf16, so
the tolerance is bf16's; the CPU variant checks the same plumbing in fp32 (gloo)."""
import pytest
from PIL import Image
from skimage import data as skdata

from helpers import logged_losses, train_to_end

pytest.importorskip("deepspeed")

TEACHERS = [{"name": "mobilenet", "family": "mobilenet_v2", "input_size": 64, "base": True},
            {"name": "vit", "family": "timm", "model": "vit_tiny_patch16_224", "weights": "none", "input_size": 64}]


def _losses(recipe):
    trainer = train_to_end(recipe)
    return logged_losses(recipe.run_dir), trainer.engine.describe()


CASES = [
    pytest.param("cpu", 3, "none", id="cpu-zero3"),  # the CPU stages and offload: test_engines.py
    pytest.param("cuda", 2, "cpu", id="cuda-zero2-offload", marks=pytest.mark.gpu),
    pytest.param("cuda", 3, "none", id="cuda-zero3", marks=pytest.mark.gpu),
]


def _one_batch_folder(folder):
    """Four photos, batch size four, no augmentation: every step trains on the same batch, so the
    logged loss must fall (on changing batches it need not in four steps)."""
    folder.mkdir()
    for i, photo in enumerate((skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket())):
        Image.fromarray(photo).resize((64, 64)).save(folder / f"{i}.png")
    return {"source": str(folder), "crop_scale_min": 1.0, "hflip": False}


@pytest.mark.slow
@pytest.mark.parametrize("device,stage,offload", CASES)
def test_deepspeed_tracks_the_torch_engine(tiny_recipe, tmp_path, device, stage, offload):
    common = dict(teachers=TEACHERS, student={"mode": "full"}, space={"calibration_images": 4},
                  data=_one_batch_folder(tmp_path / "images"),
                  optim={"lr": 1e-3, "warmup_steps": 1, "grad_clip": 1.0},
                  train={"steps": 4, "batch_size": 4, "checkpoint_every": 100, "device": device})
    reference, _ = _losses(tiny_recipe(output_dir=str(tmp_path / "torch"), engine="torch", **common))
    got, described = _losses(tiny_recipe(output_dir=str(tmp_path / "ds"), engine="deepspeed",
                                          deepspeed={"zero_stage": stage, "offload_optimizer": offload}, **common))
    assert f"ZeRO-{stage}" in described
    assert got == pytest.approx(reference, rel=3e-2 if device == "cuda" else 2e-4), (got, reference)
    assert got[-1] < got[0], got
