"""The user's own labelled folders for the probes: classes (ImageFolder) or index masks (VOC / ADE).

Classification, either layout (a class is a sub-folder; its images are found recursively)::

    FOLDER/train/<class>/*.jpg  FOLDER/val/<class>/*.jpg    fitted on train/, scored on val/
    FOLDER/<class>/*.jpg                                     a seeded val_fraction of each class scored

Segmentation::

    FOLDER/classes.txt          one class name per line; line k (from 0) is index k in the masks
    FOLDER/images/<stem>.jpg    any image extension
    FOLDER/masks/<stem>.png     8-bit index PNG (mode L or P) of the image's size; 255 = ignored

An image without a mask is left out (VOC ships more images than masks) and said in the note; a
mask without its image, a mask of another size than its image, an index that is neither 255 nor
a line of ``classes.txt``, a folder without classes: :class:`BadProbeFolder` naming the file.
Images (and masks, nearest neighbour) are resized to ``size`` x ``size``; an unreadable image is
skipped and counted in the note. Sampling is seeded (a private numpy Generator).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image

from ..errors import UserError
from .labelled import LabelledSplit, SegmentationSplit
from .sources import BadImage, load_image_file, scan_folder

IGNORE_INDEX = 255


class BadProbeFolder(UserError, ValueError):
    """A labelled folder the probes cannot use; the message names the file or folder."""


def is_segmentation_folder(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "masks").is_dir()


def _class_dirs(root: Path) -> List[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _resized(img: Image.Image, size: int, resample) -> np.ndarray:
    return np.asarray(img.resize((size, size), resample))


def _load_images(root: Path, files: List[str], size: int) -> Tuple[List[np.ndarray], List[int], int]:
    """The readable ones of ``files`` at ``size``, their positions in ``files``, and how many failed."""
    out, kept, bad = [], [], 0
    for i, f in enumerate(files):
        try:
            out.append(_resized(load_image_file(root / f), size, Image.BILINEAR))
            kept.append(i)
        except BadImage:
            bad += 1
    return out, kept, bad


def _class_files(folder: Path) -> List[str]:
    files, _, _ = scan_folder(folder)
    if not files:
        raise BadProbeFolder(f"class folder {str(folder)!r} holds no image file")
    return [f"{folder.name}/{f}" for f in files]


def load_class_folder(root: str | Path, size: int, train_per_class: int, test_per_class: int,
                      val_fraction: float, seed: int) -> LabelledSplit:
    """A classification folder (either layout above); at most ``train_per_class`` fitted and
    ``test_per_class`` scored images per class, chosen at random (seeded)."""
    root = Path(root)
    rng = np.random.default_rng([seed, 0xF01D])
    two_level = (root / "train").is_dir() and (root / "val").is_dir()
    top = root / "train" if two_level else root
    classes = _class_dirs(top)
    if not classes:
        raise BadProbeFolder(f"{str(top)!r} has no class folder: expected FOLDER/<class>/*.jpg or "
                             f"FOLDER/{{train,val}}/<class>/*.jpg")
    parts = {"train": [], "test": []}  # (folder, file relative to it, label)
    for label, name in enumerate(classes):
        if two_level:
            fit = _class_files(root / "train" / name)
            val_dir = root / "val" / name
            scored = _class_files(val_dir) if val_dir.is_dir() else []
            pairs = [(root / "train", fit), (root / "val", scored)]
        else:
            files = list(rng.permutation(_class_files(root / name)))
            if len(files) < 2:
                raise BadProbeFolder(f"class folder {str(root / name)!r} holds one image; at least 2 are "
                                     f"needed to fit on some and score the others")
            n_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
            pairs = [(root, files[n_val:]), (root, files[:n_val])]
        for split, (base, files), cap in zip(("train", "test"), pairs, (train_per_class, test_per_class)):
            chosen = sorted(rng.permutation(files)[:cap]) if len(files) > cap else sorted(files)
            parts[split] += [(base, f, label) for f in chosen]
    if two_level:
        unknown = sorted(set(_class_dirs(root / "val")) - set(classes))
        if unknown:
            raise BadProbeFolder(f"{str(root / 'val' / unknown[0])!r}: class not in {str(root / 'train')!r}")
        if not parts["test"]:
            raise BadProbeFolder(f"{str(root / 'val')!r} holds no image of a class in train/")
    out, bad = {}, 0
    for split, items in parts.items():
        images, labels = [], []
        for base, f, label in items:
            arr, kept, failed = _load_images(base, [f], size)
            images += arr
            labels += [label] * len(kept)
            bad += failed
        if not images:
            raise BadProbeFolder(f"{str(root)!r}: no readable {split} image")
        out[split] = (np.stack(images), np.asarray(labels, np.int64))
    note = f"{bad} unreadable image(s) skipped" if bad else ""
    return LabelledSplit(out["train"][0], out["train"][1], out["test"][0], out["test"][1],
                         classes=classes, name=root.name, note=note)


def read_classes(path: Path) -> List[str]:
    if not path.is_file():
        raise BadProbeFolder(f"{str(path)!r} is missing: a segmentation folder lists its classes there, one a line")
    classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not classes:
        raise BadProbeFolder(f"{str(path)!r} lists no class")
    if len(classes) > IGNORE_INDEX:
        raise BadProbeFolder(f"{str(path)!r} lists {len(classes)} classes; at most {IGNORE_INDEX} fit an 8-bit "
                             f"mask (255 is the ignore index)")
    return classes


def read_mask(path: Path, image_size: Tuple[int, int], num_classes: int) -> Image.Image:
    """An index mask, checked: 8-bit single channel, the image's size, indices < num_classes or 255."""
    try:
        mask = Image.open(path)
        mask.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadProbeFolder(f"{str(path)!r}: not a readable mask ({exc})") from None
    if mask.mode not in ("L", "P"):
        raise BadProbeFolder(f"{str(path)!r}: mode {mask.mode}, expected an 8-bit index PNG (mode L or P)")
    if mask.size != image_size:
        raise BadProbeFolder(f"{str(path)!r}: mask is {mask.size[0]}x{mask.size[1]}, its image "
                             f"{image_size[0]}x{image_size[1]}")
    values = np.unique(np.asarray(mask))
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if len(bad):
        raise BadProbeFolder(f"{str(path)!r}: index {int(bad[0])} outside classes.txt (0..{num_classes - 1}, "
                             f"{IGNORE_INDEX} = ignore)")
    return mask


def load_segmentation_folder(root: str | Path, size: int, n_train: int, n_test: int,
                             val_fraction: float, seed: int) -> SegmentationSplit:
    """A segmentation folder (layout above): a seeded ``val_fraction`` of the pairs scored, at
    most ``n_train`` fitted and ``n_test`` scored. Every pair's names are checked; the sizes and
    indices of the pairs used."""
    root = Path(root)
    classes = read_classes(root / "classes.txt")
    images = {Path(f).with_suffix("").as_posix(): f for f in scan_folder(root / "images")[0]}
    masks = {Path(f).with_suffix("").as_posix(): f for f in scan_folder(root / "masks", (".png",))[0]}
    for stem, f in masks.items():
        if stem not in images:
            raise BadProbeFolder(f"{str(root / 'masks' / f)!r} has no image {str(root / 'images' / stem)}.*")
    stems = sorted(masks)
    if len(stems) < 2:
        raise BadProbeFolder(f"{str(root / 'masks')!r} holds {len(stems)} mask(s); at least 2 are needed "
                             f"to fit on some images and score others")
    order = list(np.random.default_rng([seed, 0x5E6]).permutation(stems))
    n_val = min(len(order) - 1, max(1, round(val_fraction * len(order))))
    out, bad = {}, 0
    for split, chosen in (("train", order[n_val:][:n_train]), ("test", order[:n_val][:n_test])):
        imgs, msks = [], []
        for stem in sorted(chosen):
            try:
                img = load_image_file(root / "images" / images[stem])
            except BadImage:
                bad += 1
                continue
            mask = read_mask(root / "masks" / masks[stem], img.size, len(classes))
            imgs.append(_resized(img, size, Image.BILINEAR))
            msks.append(_resized(mask, size, Image.NEAREST))
        if not imgs:
            raise BadProbeFolder(f"{str(root / 'images')!r}: no readable {split} image")
        out[split] = (np.stack(imgs), np.stack(msks).astype(np.uint8))
    notes = [f"{n} image(s) without a mask left out" for n in [len(images) - len(masks)] if n > 0]
    notes += [f"{bad} unreadable image(s) skipped"] if bad else []
    return SegmentationSplit(out["train"][0], out["train"][1], out["test"][0], out["test"][1],
                             classes=classes, name=root.name, note="; ".join(notes))
