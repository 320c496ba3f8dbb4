"""Image data: sources (folder / tar shards / embedded), deterministic transforms, the resumable training
dataset and loader, and the labelled sets of the frozen-feature probes (built-in or folders)."""
from .sources import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    SKIMAGE_IMAGES,
    BadImage,
    EmbeddedSource,
    FolderSource,
    ImageSource,
    NoImages,
    SubsetSource,
    scan_folder,
    decode_image,
    load_image_file,
    to_rgb,
)
from .shards import BadShards, ShardSource, expand_braces, is_shard_pattern, shard_paths
from .source_spec import UnknownHoldout, build_source, recipe_sources, split_holdout
from .transforms import EvalTransform, TrainTransform, pil_to_tensor01, random_resized_crop_box
from .datasets import (
    BadImageReport,
    Indexed,
    NotEnoughImages,
    ResumableSampler,
    Skipped,
    TrainImages,
    collate_images,
    collate_indexed,
    make_train_loader,
    mix_seed,
    readable_images,
    start_epoch,
)
from .labelled import (
    FASHION_MNIST_CLASSES,
    LABELLED_SETS,
    LabelledSplit,
    SegmentationSplit,
    fashion_mnist_available,
    fashion_mnist_dir,
    load_labelled,
    read_idx_images,
    read_idx_labels,
)
from .folders import BadProbeFolder, load_class_folder, load_segmentation_folder
from .pasted import make_pasted_set
from .probe_sets import PROBE_SETS, load_probe_set

__all__ = [
    "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "SKIMAGE_IMAGES", "BadImage", "EmbeddedSource",
    "FolderSource", "ImageSource", "NoImages", "scan_folder", "build_source", "recipe_sources", "split_holdout", "UnknownHoldout", "decode_image", "load_image_file", "to_rgb",
    "BadShards", "ShardSource", "expand_braces", "is_shard_pattern", "shard_paths",
    "EvalTransform", "TrainTransform", "pil_to_tensor01", "random_resized_crop_box",
    "BadImageReport", "Indexed", "NotEnoughImages", "readable_images", "collate_indexed", "ResumableSampler", "Skipped", "TrainImages", "collate_images",
    "make_train_loader", "mix_seed", "start_epoch",
    "FASHION_MNIST_CLASSES", "LABELLED_SETS", "LabelledSplit", "fashion_mnist_available",
    "fashion_mnist_dir", "load_labelled", "read_idx_images", "read_idx_labels", "SegmentationSplit",
    "BadProbeFolder", "load_class_folder", "load_segmentation_folder", "make_pasted_set", "PROBE_SETS", "load_probe_set",
]
