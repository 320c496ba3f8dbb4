"""The teachers' side of training: frozen teachers in their low-memory form (``bits``,
``offload``), normalisers calibrated on their features, and the normalised targets a step
needs. The trainer computes targets live through it; ``lowres-kd cache`` stores them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from tqdm import tqdm

from .build import student_backbone_config
from .data import BadImageReport, TrainImages, readable_images
from .lowmem import check_fidelity, enable_offload, move_to, quantize_teacher, teacher_fidelity
from .model import InheritedModel
from .schema import Recipe
from .teachers import Features, Teacher, build_teacher

FIDELITY_IMAGES = 8  # calibration images compared before and after quantizing a teacher
MIN_CALIBRATION = 2  # readable images a normaliser needs at the least (space.calibration_images >= 2)


def log_bad_images(run_dir: Optional[Path], what: str, skipped) -> None:
    """Print and append the unreadable images of a pass to ``<run>/bad_images.log``."""
    if not skipped:
        return
    report = BadImageReport()
    report.update(0, skipped)
    text = f"{what}: " + report.format()
    tqdm.write("bad images: " + text)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "bad_images.log").open("a") as f:
            f.write(text + "\n")


def run_teacher(teacher, images: torch.Tensor, dtype: Optional[torch.dtype]) -> Features:
    """A teacher's features; with low-precision weights (bf16 teachers, or the base inside a bf16
    DeepSpeed student) under autocast in that dtype: calibration runs outside the step's autocast."""
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return teacher(images)


class TeacherTargets:
    """``TeacherTargets(...).prepare()``, then ``calibrate()`` (or load fitted normalisers) and
    ``check_fidelity()``; ``normalised(images)`` gives every teacher's targets.

    ``names``: the teachers whose targets it gives (default: all; the live ones of a hybrid run,
    the cached ones of a cache build). ``teachers`` holds those of them but the one inside the
    student (adapter mode), whose features come from the student with its adapter disabled.
    """

    def __init__(self, recipe: Recipe, model: InheritedModel, teachers: Dict[str, Teacher], device: torch.device,
                 calibration: TrainImages, bf16: bool = False, progress: bool = True, is_main: bool = True,
                 run_dir: Optional[Path] = None, names: Optional[Sequence[str]] = None):
        self.recipe, self.model, self.teachers, self.device = recipe, model, teachers, device
        self.entries = [t for t in recipe.teachers if names is None or t.name in names]
        self.calibration = calibration
        self.bf16 = bf16
        self.progress, self.is_main = progress, is_main
        self.run_dir = run_dir if is_main else None  # where bad_images.log goes
        self.fidelity_reference: Dict[str, Features] = {}
        self.report: Dict[str, dict] = {}
        self._fidelity_images: Optional[torch.Tensor] = None

    @property
    def teacher_dtype(self) -> Optional[torch.dtype]:
        """Unquantized teachers' weights: bf16 under mixed precision, else as loaded (fp32)."""
        return torch.bfloat16 if self.bf16 else None

    @property
    def fidelity_images(self) -> torch.Tensor:
        """The first readable calibration images (CPU), decoded once: fidelity before and after quantizing."""
        if self._fidelity_images is None:
            skipped = []
            try:
                batches = readable_images(self.calibration, FIDELITY_IMAGES, 1, FIDELITY_IMAGES, skipped,
                                          what=f"the fidelity check of quantized teachers (data.source)")
                self._fidelity_images = torch.cat(list(batches))
            finally:
                log_bad_images(self.run_dir, "fidelity check", skipped)
        return self._fidelity_images

    def prepare(self) -> "TeacherTargets":
        """Quantize (``bits``) and offload (``offload``) teachers as their entries ask and move
        them to the device. The full-precision features of a calibration batch are kept to check
        fidelity once the normalisers exist; for a base quantized under the adapter (quantized
        when the student was built) that reference comes from its weights built again in fp32."""
        entries = {t.name: t for t in self.recipe.teachers}
        student = self.model.student
        for t in self.entries:
            if self.recipe.inside_student(t) and student.quantization is not None:
                self._reference_base(t.name, student.quantization)
        for name, teacher in self.teachers.items():
            t = entries[name]
            if t.bits < 16:  # full-precision reference on the CPU: the teacher may not fit the device
                with torch.no_grad():
                    self.fidelity_reference[name] = teacher(self.fidelity_images)
                quant = quantize_teacher(teacher, t.bits, device="cpu" if t.offload else self.device)
                self.report[name] = {"quantization": quant.summary()}
                tqdm.write(f"teacher {name}: {quant.summary()}")
            elif self.teacher_dtype is not None:  # bf16 on CUDA: half the bytes, run under autocast
                teacher.to(self.teacher_dtype)
            if t.offload:  # blocks stay in CPU memory; the rest moves to the device
                enable_offload(teacher, self.device)
            else:
                move_to(teacher, self.device)
        return self

    def _reference_base(self, name: str, quantization) -> None:
        """The quantized adapter-mode base's fidelity reference: the same weights at full
        precision, built again on the CPU for one batch and dropped."""
        reference = build_teacher(student_backbone_config(self.recipe)).freeze()
        with torch.no_grad():
            self.fidelity_reference[name] = reference(self.fidelity_images)
        del reference
        self.report[name] = {"quantization": quantization.summary()}
        tqdm.write(f"teacher {name} (the student's base): {quantization.summary()}")

    def _teacher_fn(self, name: str):
        """What computes teacher ``name``: the student with its adapter disabled for the base in adapter mode."""
        return self.model.student.base_features if name not in self.teachers else self.teachers[name]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> Dict[str, Features]:
        """Every teacher's raw features on ``images``, in fp32."""
        out = {}
        for t in self.entries:
            f = run_teacher(self._teacher_fn(t.name), images, self.teacher_dtype)
            out[t.name] = Features(f.global_.float(), f.dense.float())
        return out

    def normalised(self, images: torch.Tensor) -> Dict[str, Features]:
        """Every teacher's features on ``images``, normalised: the training targets."""
        feats = self.features(images)  # fp32, as in calibration
        with torch.autocast(self.device.type, enabled=False):  # normalised in fp32, as fitted
            return {n: self.model.normalise(n, f) for n, f in feats.items()}

    @torch.no_grad()
    def calibrate(self) -> None:
        """Fit the normalisers of its teachers on the first ``space.calibration_images`` readable images,
        centre-cropped; unreadable ones are passed over and listed in ``bad_images.log``."""
        want = self.recipe.space.calibration_images
        was = self.model.training
        self.model.eval()
        bs = self.recipe.train.batch_size
        skipped, n = [], 0
        batches = readable_images(self.calibration, want, MIN_CALIBRATION, bs, skipped,
                                  what=f"calibration (data.source {self.recipe.data.source!r})")
        try:
            for images in tqdm(batches, total=-(-min(want, len(self.calibration)) // bs), desc="calibrate",
                               disable=not self.progress, leave=False):
                n += len(images)
                for name, f in self.features(images.to(self.device)).items():
                    self.model.norm_global[name].update(f.global_)
                    self.model.norm_dense[name].update(f.dense)
        finally:
            log_bad_images(self.run_dir, "calibration", skipped)
        for kind, norms in (("global", self.model.norm_global), ("dense", self.model.norm_dense)):
            for name in (t.name for t in self.entries):
                norm = norms[name]
                norm.fit()
                note = norm.rank_note()
                if note and self.is_main:  # a map gives one sample per position
                    images = -(-(norm.channels + 1) * n // norm.num_samples)
                    tqdm.write(f"note: teacher {name}, {kind} features: {note} "
                               f"(space.calibration_images: {images} or more)")
                norm.reset_stats()  # float64 C x C statistics: no longer needed once fitted
        self.model.train(was)

    def check_fidelity(self, run_dir: Path) -> None:
        """Quantized teachers vs their full-precision features (normalised space): stop below
        ``min_fidelity``, naming the teacher and the next bit width; write ``teachers.json``."""
        entries = {t.name: t for t in self.recipe.teachers}
        for name, reference in self.fidelity_reference.items():
            norms = (self.model.norm_global[name], self.model.norm_dense[name])
            with torch.no_grad():
                candidate = self._teacher_fn(name)(self.fidelity_images.to(self.device))
            report = teacher_fidelity(reference, candidate, normalisers=norms)
            raw = teacher_fidelity(reference, candidate)
            self.report[name].update(fidelity_normalised=report.as_dict(), fidelity_raw=raw.as_dict())
            tqdm.write(f"teacher {name}: fidelity cos {report.cos_min:.4f} (normalised), {raw.cos_min:.4f} (raw); "
                       f"relative error {report.rel_err_dense:.3f} (dense, normalised)")
            check_fidelity(report, entries[name].min_fidelity, name, entries[name].bits)
        if self.report and self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "teachers.json").write_text(json.dumps(self.report, indent=1))
