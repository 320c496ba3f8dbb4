"""Small labelled image sets for the frozen-feature probes (linear probe, k-NN), and the
split types every probe set comes as (``LabelledSplit``, ``SegmentationSplit``).

``load_labelled("fashion_mnist")`` reads the Debian ``dataset-fashion-mnist`` IDX files: the train
split comes from the 60k training file, the test split from the separate 10k ``t10k`` file, so the
two never share an image. When those files are missing the loader falls back to scikit-learn's
``digits`` (1797 8x8 images, always installed) and warns that it did so; ``"digits"`` can also be
asked for directly. Subsampling is class-balanced and seeded (a private numpy Generator; the
global RNGs are never touched).

Images come back as RGB uint8 arrays ``(N, H, W, 3)`` (grey replicated); the probe's transform
resizes them.
"""
from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from sklearn.datasets import load_digits

__all__ = [
    "LabelledSplit",
    "SegmentationSplit",
    "load_labelled",
    "LABELLED_SETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FMNIST_FILES",
    "fashion_mnist_dir",
    "fashion_mnist_available",
    "read_idx_images",
    "read_idx_labels",
]

#: Where the Debian package puts the files; ``LOWRES_KD_FASHION_MNIST_DIR`` overrides it, and
#: tests monkeypatch this module attribute.
FASHION_MNIST_DIR = Path(os.environ.get("LOWRES_KD_FASHION_MNIST_DIR",
                                        "/usr/share/datasets/fashion-mnist"))
FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGITS_CLASSES = [str(d) for d in range(10)]
LABELLED_SETS = ("fashion_mnist", "digits")


def fashion_mnist_dir() -> Path:
    """The folder searched for the Fashion-MNIST files (read at call time)."""
    return Path(FASHION_MNIST_DIR)


def fashion_mnist_available(folder: str | os.PathLike | None = None) -> bool:
    folder = Path(folder) if folder is not None else fashion_mnist_dir()
    return all((folder / fn).is_file() for fn in FMNIST_FILES.values())


# --------------------------------------------------------------------------- IDX files


def _read_gz_prefix(path: Path, nbytes: Optional[int]) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read() if nbytes is None else f.read(nbytes)


def read_idx_images(path: str | os.PathLike, count: Optional[int] = None) -> np.ndarray:
    """The first ``count`` (all if None) images of an IDX3 gz file as uint8 ``(N, rows, cols)``.

    Only the bytes needed are decompressed, so the first 64 images cost milliseconds.
    """
    path = Path(path)
    header = _read_gz_prefix(path, 16)
    if len(header) < 16:
        raise ValueError(f"{str(path)!r}: too short for an IDX image file")
    magic, n, rows, cols = (int.from_bytes(header[k:k + 4], "big") for k in (0, 4, 8, 12))
    if magic != 2051:
        raise ValueError(f"{str(path)!r}: not an IDX3 image file (magic {magic}, expected 2051)")
    take = n if count is None else min(int(count), n)
    data = _read_gz_prefix(path, 16 + take * rows * cols)
    if len(data) < 16 + take * rows * cols:
        raise ValueError(f"{str(path)!r}: truncated ({len(data) - 16} of "
                         f"{take * rows * cols} image bytes)")
    return np.frombuffer(data, np.uint8, offset=16, count=take * rows * cols).reshape(take, rows, cols)


def read_idx_labels(path: str | os.PathLike, count: Optional[int] = None) -> np.ndarray:
    """The first ``count`` (all if None) labels of an IDX1 gz file as int64 ``(N,)``."""
    path = Path(path)
    header = _read_gz_prefix(path, 8)
    if len(header) < 8:
        raise ValueError(f"{str(path)!r}: too short for an IDX label file")
    magic, n = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    if magic != 2049:
        raise ValueError(f"{str(path)!r}: not an IDX1 label file (magic {magic}, expected 2049)")
    take = n if count is None else min(int(count), n)
    data = _read_gz_prefix(path, 8 + take)
    if len(data) < 8 + take:
        raise ValueError(f"{str(path)!r}: truncated ({len(data) - 8} of {take} labels)")
    return np.frombuffer(data, np.uint8, offset=8, count=take).astype(np.int64)


# --------------------------------------------------------------------------- the split


class _SplitSummary:
    """What both kinds of probe set share: a class count and a one-line repr."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, train {tuple(self.train_images.shape)}, "
                f"test {tuple(self.test_images.shape)}, {self.num_classes} classes)")


@dataclass(repr=False)
class LabelledSplit(_SplitSummary):
    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: List[str]
    name: str
    note: str = ""  # e.g. why a fallback was used
    extra: Dict[str, object] = field(default_factory=dict)

    kind = "classification"


@dataclass(repr=False)
class SegmentationSplit(_SplitSummary):
    """Images with per-pixel class masks (255: ignored), split into fitted and scored images."""

    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_masks: np.ndarray  # (N, H, W) uint8 class indices
    test_images: np.ndarray
    test_masks: np.ndarray
    classes: List[str]
    name: str
    note: str = ""

    kind = "segmentation"


def _gray_to_rgb(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(images[..., None], 3, axis=-1))


def _balanced_take(labels: np.ndarray, candidates: np.ndarray, n: int, num_classes: int,
                   rng: np.random.Generator, what: str) -> np.ndarray:
    """``n`` indices from ``candidates``, as equal per class as possible, in a seeded order.

    ``n // C`` per class; the ``n % C`` extra ones go to classes picked by ``rng``.
    """
    per = np.full(num_classes, n // num_classes, dtype=np.int64)
    per[rng.permutation(num_classes)[: n % num_classes]] += 1
    chosen = []
    for c in range(num_classes):
        pool = candidates[labels[candidates] == c]
        if per[c] > len(pool):
            raise ValueError(f"{what}: class {c} has {len(pool)} images, {per[c]} needed for "
                             f"a balanced sample of {n}")
        chosen.append(rng.permutation(pool)[: per[c]])
    out = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return np.sort(out)


def _check_sizes(n_train: int, n_test: int) -> Tuple[int, int]:
    for key, v in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{key} must be a positive integer, got {v!r}")
    return int(n_train), int(n_test)


def _load_fashion_mnist(folder: Path, n_train: int, n_test: int, seed: int) -> LabelledSplit:
    rng = np.random.default_rng([seed, 0xF417])
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = read_idx_labels(folder / FMNIST_FILES[f"{split}_labels"])
        if n > len(labels):
            raise ValueError(f"fashion_mnist: n_{split}={n} but the {split} file holds "
                             f"{len(labels)} images")
        idx = _balanced_take(labels, np.arange(len(labels)), n, 10, rng, f"fashion_mnist {split}")
        # Decompress only up to the last index needed.
        images = read_idx_images(folder / FMNIST_FILES[f"{split}_images"], count=int(idx.max()) + 1)
        out[split] = (_gray_to_rgb(images[idx]), labels[idx].astype(np.int64), idx)
    return LabelledSplit(
        train_images=out["train"][0], train_labels=out["train"][1],
        test_images=out["test"][0], test_labels=out["test"][1],
        classes=list(FASHION_MNIST_CLASSES), name="fashion_mnist",
        extra={"train_index": out["train"][2], "test_index": out["test"][2], "folder": str(folder)},
    )


def _load_digits(n_train: int, n_test: int, seed: int, clip: bool) -> LabelledSplit:
    bunch = load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    images = np.round(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    counts = np.bincount(labels, minlength=10)
    note = ""
    if clip:
        # Fallback use: the sizes were meant for Fashion-MNIST; shrink to what digits can give.
        cmin = int(counts.min())
        n_test_c = min(n_test, 10 * (cmin // 3))  # at most a third of the smallest class
        n_train_c = min(n_train, 10 * (cmin - -(-n_test_c // 10)))
        if (n_train_c, n_test_c) != (n_train, n_test):
            note = (f"sizes clipped to what digits holds: n_train {n_train}->{n_train_c}, "
                    f"n_test {n_test}->{n_test_c}")
        n_train, n_test = n_train_c, n_test_c
    if n_train + n_test > len(labels):
        raise ValueError(f"digits: n_train + n_test = {n_train + n_test} but digits holds "
                         f"{len(labels)} images")
    rng = np.random.default_rng([seed, 0xD161])
    # Seeded stratified split: the test sample first, then the train sample from the rest.
    test_idx = _balanced_take(labels, np.arange(len(labels)), n_test, 10, rng, "digits test")
    rest = np.setdiff1d(np.arange(len(labels)), test_idx)
    train_idx = _balanced_take(labels, rest, n_train, 10, rng, "digits train")
    return LabelledSplit(
        train_images=_gray_to_rgb(images[train_idx]), train_labels=labels[train_idx],
        test_images=_gray_to_rgb(images[test_idx]), test_labels=labels[test_idx],
        classes=list(DIGITS_CLASSES), name="digits", note=note,
        extra={"train_index": train_idx, "test_index": test_idx},
    )


def load_labelled(name: str = "fashion_mnist", n_train: int = 1000, n_test: int = 500,
                  seed: int = 0, fmnist_dir: str | os.PathLike | None = None) -> LabelledSplit:
    """A class-balanced, seeded, disjoint train/test labelled split.

    ``name``: ``"fashion_mnist"`` (train from the 60k file, test from the 10k file) or
    ``"digits"``. Asking for ``fashion_mnist`` on a machine without its files falls back to
    ``digits`` with a ``UserWarning`` that says so (``split.name`` is then ``"digits"`` and
    ``split.note`` explains; sizes larger than digits can give are clipped, also said).
    """
    n_train, n_test = _check_sizes(n_train, n_test)
    if name not in LABELLED_SETS:
        raise ValueError(f"unknown labelled set {name!r}; choose one of {', '.join(LABELLED_SETS)}")
    if name == "digits":
        return _load_digits(n_train, n_test, seed, clip=False)
    folder = Path(fmnist_dir) if fmnist_dir is not None else fashion_mnist_dir()
    if fashion_mnist_available(folder):
        return _load_fashion_mnist(folder, n_train, n_test, seed)
    split = _load_digits(n_train, n_test, seed, clip=True)
    why = (f"Fashion-MNIST files not found in {str(folder)!r} (install the Debian package "
           f"dataset-fashion-mnist); using the 'digits' set instead")
    split.note = why + (f"; {split.note}" if split.note else "")
    warnings.warn("load_labelled: " + split.note, UserWarning, stacklevel=2)
    return split
