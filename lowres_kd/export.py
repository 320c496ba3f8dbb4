"""Export the trained backbone alone, LoRA merged, as a plain state dict (DESIGN §2.5).

The file holds the family's own network (``teacher.net``): a timm model's keys for the timm
family (``timm.create_model(name, pretrained_cfg_overlay=dict(file=...))`` or
``load_state_dict`` read it), torchvision's for MobileNetV2. It can also be named as a teacher's
``weights`` in the next recipe.
"""
from __future__ import annotations

import copy
from pathlib import Path

from safetensors.torch import save_file

from .api import load


def export_backbone(run_or_checkpoint: str | Path, out: str | Path) -> Path:
    model = load(run_or_checkpoint)
    student = copy.deepcopy(model.student)
    body = student.backbone.merge_and_unload() if student.mode == "adapter" else student.backbone
    state = {k: v.contiguous() for k, v in body.net.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata={"source": str(run_or_checkpoint), "family": body.spec.family})
    tmp.replace(out)
    return out
