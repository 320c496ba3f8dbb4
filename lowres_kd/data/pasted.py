"""``pasted``: a built-in segmentation set made from real pictures, with exact pixel masks.

Each image is a random square crop of one of the embedded photos (skimage / scikit-learn, see
``EmbeddedSource``), resized to ``size``, with one or two Fashion-MNIST items pasted on it at a
random place and scale (a side of 30-60 % of the image). An item's pixels brighter than
``ITEM_THRESHOLD`` are its mask (class = 1 + its label; 0 is the photo, ``background``) and are
painted with the item's grey level; a later item covers an earlier one. Fitted images take their
items from Fashion-MNIST's training file, scored images from its separate test file (scikit-learn's
digits, split apart, when Fashion-MNIST is not installed; the note says so). The photos are
shared by both (there are 23), the crops are not. Everything follows from ``seed``.
"""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from .labelled import SegmentationSplit, load_labelled
from .sources import EmbeddedSource

ITEM_THRESHOLD = 40  # of 255: darker item pixels are the item's own black background
SCALE = (0.3, 0.6)  # an item's side, as a share of the image's
MAX_ITEMS = 2


def _compose(photo: np.ndarray, items: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator):
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    image = np.array(Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR))
    mask = np.zeros((size, size), np.uint8)
    for item, label in zip(items, labels):
        s = max(4, int(round(rng.uniform(*SCALE) * size)))
        grey = np.asarray(Image.fromarray(item).resize((s, s), Image.BILINEAR))
        top, left = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
        on = grey > ITEM_THRESHOLD
        image[top:top + s, left:left + s][on] = grey[on, None]
        mask[top:top + s, left:left + s][on] = 1 + label
    return image, mask


def make_pasted_set(n_train: int, n_test: int, size: int, seed: int) -> SegmentationSplit:
    """``n_train`` fitted and ``n_test`` scored images of ``size`` x ``size`` with their masks."""
    rng = np.random.default_rng([seed, 0xBA57E])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fallback to digits is said in the note
        source = EmbeddedSource(fashion_mnist=0)
        photos = [np.asarray(source.load(i)) for i in range(len(source))]
        items = load_labelled("fashion_mnist", n_train=MAX_ITEMS * n_train, n_test=MAX_ITEMS * n_test, seed=seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        pool_images = getattr(items, f"{split}_images")[..., 0]
        pool_labels = getattr(items, f"{split}_labels")
        order = rng.permutation(len(pool_labels))
        images, masks = [], []
        for i in range(n):
            k = int(rng.integers(1, MAX_ITEMS + 1))
            pick = order[(MAX_ITEMS * i) % len(order):][:k]
            image, mask = _compose(photos[int(rng.integers(len(photos)))], pool_images[pick], pool_labels[pick],
                                   size, rng)
            images.append(image)
            masks.append(mask)
        out[split] = (np.stack(images), np.stack(masks))
    return SegmentationSplit(out["train"][0], out["train"][1], out["test"][0], out["test"][1],
                             classes=["background", *items.classes], name="pasted",
                             note=f"items from {items.name}" + (f" ({items.note})" if items.note else ""))
