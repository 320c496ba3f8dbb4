"""What a ``data.source`` value names: the embedded photos, tar shards or a folder of images.

Kept apart from the sources themselves: choosing needs every kind of source, and each kind needs
only the decoding in ``sources.py``.
"""
from __future__ import annotations

import os

from typing import Sequence, Tuple

from ..errors import UserError
from .shards import ShardSource, is_shard_pattern
from .sources import EmbeddedSource, FolderSource, ImageSource, SubsetSource

__all__ = ["build_source", "recipe_sources", "split_holdout", "UnknownHoldout"]


class UnknownHoldout(UserError, ValueError):
    """``data.holdout`` names an image the source does not hold."""


def build_source(spec: str | os.PathLike, fashion_mnist: int = 64, **kwargs) -> ImageSource:
    """``"embedded"`` -> :class:`EmbeddedSource` (with ``fashion_mnist`` Fashion-MNIST images);
    a spec that names ``.tar`` files after brace expansion (``/data/train-{000..099}.tar``) ->
    :class:`ShardSource`; anything else is a folder path. ``fashion_mnist`` counts only for the
    embedded set.

    A folder that happens to be called ``embedded`` is reached as ``./embedded``. Other keyword
    arguments go to the chosen class (e.g. ``max_pixels=...`` for a folder or shards).
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"image source must be 'embedded', tar shards or a folder path, got {spec!r}")
    if isinstance(spec, str) and spec.strip().lower() == "embedded":
        return EmbeddedSource(fashion_mnist=fashion_mnist, **kwargs)
    if is_shard_pattern(spec):
        return ShardSource(spec, **kwargs)
    return FolderSource(spec, **kwargs)


def split_holdout(source: ImageSource, holdout: Sequence[str]) -> Tuple[ImageSource, ImageSource]:
    """(training images, held-out images): ``holdout`` names items of ``source`` (``skimage:coffee``,
    a relative path, ``shard.tar:key.jpg``) that training and calibration never see, kept in the
    order given for the probes (``probe.images: holdout``). Without names, ``source`` trains whole."""
    if not holdout:
        return source, SubsetSource(source, [])
    index = {name: i for i, name in enumerate(source.names())}
    unknown = [name for name in holdout if name not in index]
    if unknown:
        shown = ", ".join(list(index)[:6])
        raise UnknownHoldout(f"data.holdout: {', '.join(map(repr, unknown))} not in the image source "
                             f"({len(index)} items, e.g. {shown})")
    held = {index[name] for name in holdout}
    if len(held) == len(index):
        raise UnknownHoldout(f"data.holdout: holds out all {len(index)} images of the source; training needs some")
    return (SubsetSource(source, [i for i in range(len(source)) if i not in held]),
            SubsetSource(source, [index[name] for name in holdout]))


def recipe_sources(data) -> Tuple[ImageSource, ImageSource]:
    """(training images, held-out images) of a recipe's ``data`` section: its ``source`` split by
    its ``holdout``, as the trainer and the probes must both see it."""
    return split_holdout(build_source(data.source, fashion_mnist=data.fashion_mnist), data.holdout)
