"""Export the trained backbone alone, LoRA merged, as a plain state dict (DESIGN §2.5).

A base quantized under the adapter (8/4-bit) is exported in fp32: its weights as the quantized
layers compute with them (int8 rows times their scales, nf4 blocks decoded) plus the LoRA delta.

The file holds the family's own network (``teacher.net``): a timm model's keys for the timm
family (``timm.create_model(name, pretrained_cfg_overlay=dict(file=...))`` or
``load_state_dict`` read it), torchvision's for MobileNetV2. It can also be named as a teacher's
``weights`` in the next recipe.

Nothing is lost: the file is refused inside the run's own folders (``model/``, ``checkpoints/``,
``cache/``, a checkpoint given itself), onto a folder, or over an existing file unless
``force``; it is written to a temporary sibling that is removed on any failure and renamed into
place when complete.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from safetensors.torch import save_file

from .api import load
from .errors import UserError
from .lowmem import dequantize_linears
from .rundir import checkpoint as ckpt

RUN_FOLDERS = ("model", "checkpoints", "cache")  # what lowres-kd itself writes and reads in a run


class ExportError(UserError):
    pass


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def protected_folders(run_or_checkpoint: Path) -> list:
    """The folders of a run that ``export`` must not write into."""
    given = Path(run_or_checkpoint).resolve()
    run = given
    if (given / ckpt.COMPLETE).is_file():  # a checkpoint itself: its run is above it
        run = given.parent.parent if given.parent.name == "checkpoints" else given.parent
        return [given] + [run / f for f in RUN_FOLDERS]
    return [given / f for f in RUN_FOLDERS]


def check_target(run_or_checkpoint: str | Path, out: str | Path, force: bool = False) -> Path:
    out = Path(out)
    if out.name in ("", ".", "..") or out.is_dir():
        raise ExportError(f"export: {out} is a folder; give a file path, e.g. {out / 'backbone.safetensors'}")
    real = out.resolve()
    for folder in protected_folders(Path(run_or_checkpoint)):
        if _inside(real, folder.resolve()):
            raise ExportError(f"export: {out} lies inside the run's own folder {folder}, which lowres-kd reads "
                              f"and rewrites; write the backbone elsewhere, e.g. {folder.parent / 'backbone.safetensors'}")
    if out.exists() and not force:
        raise ExportError(f"export: {out} already exists; pass --force to replace it, or choose another path")
    return out


def export_backbone(run_or_checkpoint: str | Path, out: str | Path, force: bool = False) -> Path:
    out = check_target(run_or_checkpoint, out, force)
    model = load(run_or_checkpoint)
    student = copy.deepcopy(model.student)
    if student.mode == "adapter":
        dequantize_linears(student.backbone)  # a quantized base: the delta is added to fp32 weights, not re-quantized
        body = student.backbone.merge_and_unload()
    else:
        body = student.backbone
    state = {k: v.contiguous() for k, v in body.net.state_dict().items()}
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp), metadata={"source": str(run_or_checkpoint), "family": body.spec.family})
        os.replace(tmp, out)
    except OSError as exc:
        raise ExportError(f"export: cannot write {out} ({exc.strerror or exc}); choose a writable path") from exc
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # its folder does not exist: nothing was written
            pass
    return out
