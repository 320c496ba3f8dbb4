"""Image data: sources (folder / embedded), deterministic transforms, the resumable training
dataset and loader, and the small labelled sets used by the frozen-feature probes."""
from .sources import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    SKIMAGE_IMAGES,
    BadImage,
    EmbeddedSource,
    FolderSource,
    ImageSource,
    build_source,
    load_image_file,
    to_rgb,
)
from .transforms import EvalTransform, TrainTransform, pil_to_tensor01, random_resized_crop_box
from .datasets import (
    BadImageReport,
    Indexed,
    ResumableSampler,
    Skipped,
    TrainImages,
    collate_images,
    collate_indexed,
    make_train_loader,
    mix_seed,
    start_epoch,
)
from .labelled import (
    FASHION_MNIST_CLASSES,
    LABELLED_SETS,
    LabelledSplit,
    fashion_mnist_available,
    fashion_mnist_dir,
    load_labelled,
    read_idx_images,
    read_idx_labels,
)

__all__ = [
    "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "SKIMAGE_IMAGES", "BadImage", "EmbeddedSource",
    "FolderSource", "ImageSource", "build_source", "load_image_file", "to_rgb",
    "EvalTransform", "TrainTransform", "pil_to_tensor01", "random_resized_crop_box",
    "BadImageReport", "Indexed", "collate_indexed", "ResumableSampler", "Skipped", "TrainImages", "collate_images",
    "make_train_loader", "mix_seed", "start_epoch",
    "FASHION_MNIST_CLASSES", "LABELLED_SETS", "LabelledSplit", "fashion_mnist_available",
    "fashion_mnist_dir", "load_labelled", "read_idx_images", "read_idx_labels",
]
