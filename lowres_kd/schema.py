"""The recipe schema: plain dataclasses, the only place defaults live.

A key with a fixed set of values declares it once, with ``one_of(default, *others)`` (a list
of such values: ``some_of``); a key whose values are the names of a registry declares which
one with ``registered(kind)``. The
recipe loader (``lowres_kd.config``) reads both from the field metadata, so neither the
allowed values nor the registries' contents are written anywhere else. This module imports
nothing of the package.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union


def one_of(default: str, *others: str):
    """A string key whose value is ``default`` or one of ``others``."""
    return field(default=default, metadata={"choices": (default, *others)})


def some_of(default: List[str], *choices: str):
    """A list key whose items are each one of ``choices``."""
    return field(default_factory=lambda: list(default), metadata={"choices": choices})


def registered(kind: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A key (or a list of them) naming items of the ``kind`` registry (teacher, normalizer,
    distance, probe)."""
    return field(default=default, default_factory=factory, metadata={"registry": kind})


@dataclass
class TeacherConfig:
    name: str  # unique name in this run, used in logs and outputs
    family: str = registered("teacher")  # `lowres-kd list` shows the registered families
    weights: str = "shipped"  # shipped | hub | none | path to .safetensors/.pt; onnx: path to .onnx | shipped:<package>
    model: str = ""  # model name inside the family (timm: e.g. vit_small_patch16_224)
    input_size: int = 0  # 0: the family's own default
    layer: Union[int, str] = "last"  # dense feature layer: "last" or a block index
    dense_grid: int = 0  # N: dense targets average-pooled to at most N x N (a full-resolution map); 0: as given
    weight: Optional[float] = None  # w_t in the total loss; None: 1/T
    base: bool = False  # the general-purpose teacher the student starts from
    bits: int = 16  # 16 | 8 (bitsandbytes int8) | 4 (nf4): the teacher's linear layers
    offload: bool = False  # keep blocks in CPU memory, stream them to the GPU one ahead of use
    min_fidelity: float = 0.95  # quantized teachers: stop if feature cosine vs full precision is lower
    cache: bool = True  # stored by `lowres-kd cache`; false: runs live even with teachers_from: cache (hybrid)
    # graph teachers (family onnx) only: the tensors to distil and the input normalisation
    outputs: Dict[str, str] = field(default_factory=dict)  # {dense: NAME, global: NAME}; global optional
    mean: List[float] = field(default_factory=list)  # per RGB channel; []: ImageNet's
    std: List[float] = field(default_factory=list)


@dataclass
class StudentConfig:
    # adapter: base frozen, LoRA + heads train; full: every weight trains; scratch: random init
    mode: str = one_of("adapter", "full", "scratch")
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    input_size: int = 0  # 0: the base teacher's input size
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30 % more compute
    # The backbone: "" takes the base teacher's. In full/scratch mode the student may be a smaller
    # model of the same family (a ViT-B/14 student for a DINOv2-L base, DESIGN §2.4).
    family: str = ""
    model: str = ""
    weights: str = ""  # shipped | hub | none | path; "": the base teacher's weights


@dataclass
class SpaceConfig:
    normalizer: str = registered("normalizer", "phi-s")
    calibration_images: int = 64  # images seen by the calibration pass
    head_hidden: int = 512  # hidden width of each student-to-teacher MLP head


@dataclass
class LossConfig:
    distance: str = registered("distance", "cos_smoothl1")
    alpha: float = 0.5  # weight of (1 - cos) in cos_smoothl1
    beta: float = 1.0  # smooth-L1 transition point (0: L1)
    global_weight: float = 1.0  # lambda_g
    dense_weight: float = 1.0  # lambda_d
    teacher_drop: float = 0.0  # p of dropping each teacher but the highest-loss one, per step
    kernels: str = one_of("auto", "torch", "triton")  # how the head's last linear + loss run


@dataclass
class DataConfig:
    source: str = "embedded"  # embedded | a folder of images (recursive)
    image_size: int = 160  # crop size fed to the models
    crop_scale_min: float = 0.35  # random resized crop: smallest area fraction
    hflip: bool = True
    fashion_mnist: int = 64  # Fashion-MNIST images added to the embedded set
    # names of source images training and calibration never see (skimage:coffee, a relative
    # path): the probes' unseen images with probe.images: holdout
    holdout: List[str] = field(default_factory=list)
    num_workers: int = 0


@dataclass
class CacheConfig:
    dir: str = ""  # "": <run dir>/cache
    dtype: str = one_of("fp16", "int8")  # storage of the normalised targets (int8: per-row scale)
    epochs: int = 4  # augmented views cached per image; training reuses them every `epochs` epochs
    shard_images: int = 1024  # images per shard file
    rank: Optional[int] = None  # PCA coefficients a row instead of every channel (None: all channels)
    rank_images: int = 256  # cached training views (epoch 0 first) the PCA basis is fitted on


@dataclass
class OptimConfig:
    name: str = one_of("adamw", "adamw8bit")  # adamw8bit: bitsandbytes, a quarter of AdamW's state
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0: off


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # images per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    device: str = one_of("auto", "cpu", "cuda")
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    log_every: int = 1
    # where each logged step goes: log.csv (always: reports and resume read it), and optionally
    # TensorBoard scalars in <run dir>/tensorboard (needs the tensorboard package)
    log: List[str] = some_of(["csv"], "csv", "tensorboard")
    checkpoint_every: int = 50
    keep_last: int = 2  # newest step checkpoints kept (the final step's included; model/ is apart)
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops


@dataclass
class DeepSpeedConfig:
    """Used when the engine is DeepSpeed (``engine: deepspeed``, or ``auto`` on CUDA)."""

    zero_stage: int = 2  # 0 | 1 | 2 | 3: what is partitioned across ranks (optimizer, +grads, +params)
    offload_optimizer: str = one_of("none", "cpu")  # cpu: optimizer state and update on the CPU
    offload_param: str = one_of("none", "cpu")  # cpu: parameters in CPU memory between uses (ZeRO-3)


@dataclass
class PlanConfig:
    """The memory planner (``lowres-kd plan``; ``memory: auto`` applies its choice to training)."""

    gpu_mem: str = ""  # budget per GPU, e.g. 12GiB; "": the device's total memory
    reserve: float = 0.1  # fraction of the budget kept free for the allocator's fragmentation


@dataclass
class ProbeConfig:
    probes: List[str] = registered("probe", factory=lambda: ["linear", "knn", "segmentation", "edges", "fidelity"])
    # labelled sets: fashion_mnist | digits (classes), pasted (segmentation) or a folder; linear and
    # knn score on every classification set, segmentation on every segmentation set
    data: List[str] = field(default_factory=lambda: ["fashion_mnist", "pasted"])
    train_per_class: int = 20  # classification images fitted per class (at most, in a folder)
    test_per_class: int = 20  # classification images scored per class (at most, in a folder)
    val_fraction: float = 0.3  # a folder without train/ and val/ (and every segmentation folder): share scored
    knn_k: int = 20  # neighbours voting in the knn probe
    knn_temperature: float = 0.07  # vote weight exp(cosine / T)
    segmentation_train: int = 32  # images fitted by the segmentation probe (at most, in a folder)
    segmentation_test: int = 32  # images scored by the segmentation probe (at most, in a folder)
    segmentation_steps: int = 100  # full-batch Adam steps of its 1x1 classifier
    # images of the label-free probes: "" (edges: data.source; fidelity: the first probe.data set's
    # scored images), "holdout" (data.holdout), "embedded" or a folder the student never trained on
    images: str = ""
    edge_images: int = 16  # images for the edge probe (half fit, half score)
    fidelity_images: int = 16
    image_size: int = 0  # 0: the data image size


@dataclass
class Recipe:
    name: str
    teachers: List[TeacherConfig]
    output_dir: str = "runs/{name}"
    # live: run the teachers; cache: read `lowres-kd cache` targets (teachers with cache: false still run live)
    teachers_from: str = one_of("live", "cache")
    # auto: DeepSpeed on CUDA when installed, else torch
    engine: str = one_of("auto", "deepspeed", "torch")
    # manual: the recipe's settings; auto: the planner picks batch, bits, offload, checkpointing
    memory: str = one_of("manual", "auto")
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache.dir.format(name=self.name)) if self.cache.dir else self.run_dir / "cache"

    @property
    def base_teacher(self) -> TeacherConfig:
        return next(t for t in self.teachers if t.base)

    @property
    def student_base_bits(self) -> int:
        """Bits of the student's frozen base: the base teacher's ``bits`` in adapter mode (8/4:
        its linears are bitsandbytes layers under the LoRA adapter), else 16."""
        base = next((t for t in self.teachers if t.base), None)
        return base.bits if base is not None and self.student.mode == "adapter" else 16

    def inside_student(self, t: TeacherConfig) -> bool:
        """In adapter mode the base teacher is the student itself: its targets come from the
        student's own weights with the adapter disabled, and no second copy is built."""
        return t.base and self.student.mode == "adapter"

    @property
    def cached_teachers(self) -> List[TeacherConfig]:
        """The teachers whose targets ``lowres-kd cache`` stores (``cache: true``)."""
        return [t for t in self.teachers if t.cache]

    @property
    def live_teachers(self) -> List[TeacherConfig]:
        """The teachers a training step runs: all, or with ``teachers_from: cache`` those with ``cache: false``."""
        return [t for t in self.teachers if self.teachers_from == "live" or not t.cache]

    def teacher_weight(self, t: TeacherConfig) -> float:
        return t.weight if t.weight is not None else 1.0 / len(self.teachers)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
