"""What a ``data.source`` value names: the embedded photos, tar shards or a folder of images.

Kept apart from the sources themselves: choosing needs every kind of source, and each kind needs
only the decoding in ``sources.py``.
"""
from __future__ import annotations

import os

from .shards import ShardSource, is_shard_pattern
from .sources import EmbeddedSource, FolderSource, ImageSource

__all__ = ["build_source"]


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
