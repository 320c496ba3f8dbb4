"""Images inside tar shards in the WebDataset layout: ``data.source: /data/train-{000000..000099}.tar``.

A large image set is often kept as a few hundred tar files rather than millions of small files
(file systems and copies handle those badly). :class:`ShardSource` reads such shards in place:

* the pattern is brace-expanded as a shell does (:func:`expand_braces`: ``{000..099}`` keeps its
  zero padding, ``{a,b}`` lists alternatives) and the shards are taken in that order;
* the constructor lists each shard's members from their headers alone (no pixel is read) and keeps
  the regular files with an image extension, any case, in tar order (hidden ones, ``._x.jpg``,
  are left out as in a folder). Item ``i`` is therefore fixed by the shards themselves, so
  index-based sampling, resume and teacher caches are as exact as over a folder;
* ``load(i)`` reads that member's bytes at its offset and decodes them with
  :func:`~lowres_kd.data.sources.decode_image`, the decoder of folder files: same colour rules,
  pixel limit and EXIF orientation, and an unreadable member raises :class:`BadImage` named
  ``<shard file name>/<member name>``, which the training dataset skips and counts.

Shards must be uncompressed tar (``tar cf``): the byte offsets that make a member readable without
reading what comes before it exist only there.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import BinaryIO, List, Tuple

import numpy as np
from PIL import Image

from ..errors import UserError
from .sources import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, ImageSource, NoImages, checked_max_pixels,
                      decode_image)

__all__ = ["BadShards", "ShardSource", "expand_braces", "is_shard_pattern", "shard_paths", "MAX_OPEN_SHARDS", "MAX_SHARDS"]

#: Open shard files one process keeps (least recently used closed first): under the usual limit
#: of 1024 open files also with hundreds of shards and several DataLoader workers.
MAX_OPEN_SHARDS = 64

#: The most names a pattern may stand for (a billion images at 10 000 a shard): a larger one is a
#: typo, and listing its names would exhaust memory before any check could say so.
MAX_SHARDS = 100_000

_RANGE = re.compile(r"(\d+)\.\.(\d+)")


class BadShards(UserError, ValueError):
    """A shard pattern that names a missing file or a file that is not an uncompressed tar."""


def expand_braces(pattern: str) -> List[str]:
    """Every name ``pattern`` stands for, in the order a shell gives them.

    ``{3..5}`` counts (``{05..10}`` keeps the zero padding, as does ``{5..010}``), ``{a,b}`` lists
    alternatives; groups may follow each other and nest. Braces that are neither (``{x}``, one left
    open) are kept as written, so a plain path comes back unchanged. More than :data:`MAX_SHARDS`
    names raise :class:`BadShards`.
    """
    try:
        return _expand(pattern)
    except _TooMany:
        raise BadShards(f"{pattern!r} stands for more than {MAX_SHARDS} names; check its braces") from None


class _TooMany(Exception):
    """An expansion past MAX_SHARDS names, raised before its list is built."""


def _expand(pattern: str) -> List[str]:
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:  # never closed: a literal brace
        return [pattern[:start + 1] + rest for rest in _expand(pattern[start + 1:])]
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    alternatives = _alternatives(body)
    if alternatives is None:  # a literal group, kept; what it holds may still expand
        middles = ["{" + inner + "}" for inner in _expand(body)]
    else:
        middles = [name for alt in alternatives for name in _expand(alt)]
    rests = _expand(tail)
    if len(middles) * len(rests) > MAX_SHARDS:
        raise _TooMany
    return [head + middle + rest for middle in middles for rest in rests]


def _alternatives(body: str) -> List[str] | None:
    """What the group ``{body}`` expands to (before any nested group), or None for a literal."""
    numbers = _RANGE.fullmatch(body)
    if numbers:
        first, last = (int(n) for n in numbers.groups())
        if abs(last - first) >= MAX_SHARDS:
            raise _TooMany
        padded = any(len(n) > 1 and n.startswith("0") for n in numbers.groups())
        width = max(len(n) for n in numbers.groups()) if padded else 0
        step = 1 if last >= first else -1
        return [str(k).zfill(width) for k in range(first, last + step, step)]
    parts, depth, begin = [], 0, 0
    for k, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(body[begin:k])
            begin = k + 1
    return parts + [body[begin:]] if parts else None


def is_shard_pattern(spec: str | os.PathLike) -> bool:
    """Whether ``data.source`` names tar shards: a name it expands to ends with ``.tar``."""
    return any(name.lower().endswith(".tar") for name in expand_braces(str(spec)))


def shard_paths(pattern: str | os.PathLike) -> List[Path]:
    """The shard files of ``pattern`` in its order; :class:`BadShards` when any does not exist
    (checked before anything is opened, so a typo costs no scan)."""
    paths = [Path(name).expanduser() for name in expand_braces(str(pattern))]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise BadShards(f"tar shards {str(pattern)!r}: {len(missing)} of {len(paths)} shard file(s) do not exist, "
                        f"the first is {str(missing[0])!r}; check the path and the {{first..last}} range")
    return paths


def _hidden(member: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in member.parts)


class ShardSource(ImageSource):
    """Every image member of the tar shards ``pattern`` names, in shard order then tar order.

    ``name(i)`` is ``<shard file name>/<member name>``. The constructor raises :class:`BadShards`
    for a missing shard or one that is not an uncompressed tar, and :class:`NoImages` when no shard
    holds an image member; each message names the pattern or the file. ``max_pixels`` and
    ``background`` act as in :class:`~lowres_kd.data.sources.FolderSource`.

    A process opens the shards it reads when it first reads them and keeps them open (at most
    :data:`MAX_OPEN_SHARDS`); pickling, as spawned DataLoader workers are started, leaves them behind.
    """

    def __init__(
        self,
        pattern: str | os.PathLike,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        background: Tuple[int, int, int] = (255, 255, 255),
    ):
        self.pattern = str(pattern)
        self.max_pixels = checked_max_pixels(max_pixels)
        self.background = tuple(int(c) for c in background)
        self.shards = shard_paths(self.pattern)
        names: List[str] = []
        where: List[Tuple[int, int, int]] = []  # (shard index, data offset, size) of each image member
        self.others = 0  # members left out: folders, links, other extensions, hidden files
        for k, path in enumerate(self.shards):
            for member in _members(path):
                key = PurePosixPath(member.name)
                if not member.isreg() or member.issparse() or _hidden(key) or key.suffix.lower() not in IMAGE_EXTENSIONS:
                    self.others += 1
                    continue
                names.append(f"{path.name}/{key}")
                where.append((k, member.offset_data, member.size))
        if not names:
            raise NoImages(f"tar shards {self.pattern!r}: {len(self.shards)} shard(s) hold no image member "
                           f"({', '.join(IMAGE_EXTENSIONS)}; {self.others} other member(s) found)")
        self._names = names
        self._where = np.asarray(where, dtype=np.int64)
        self._open_files: OrderedDict[int, BinaryIO] = OrderedDict()

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"ShardSource({self.pattern!r}, {len(self.shards)} shards, {len(self)} images)"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open_files": OrderedDict()}  # open files do not travel to a worker

    def name(self, i: int) -> str:
        return self._names[self._check_index(i)]

    def load(self, i: int) -> Image.Image:
        i = self._check_index(i)
        name = self._names[i]
        shard, offset, size = (int(v) for v in self._where[i])
        try:  # pread moves no shared read position: forked DataLoader workers may use the files they inherit
            data = os.pread(self._file(shard).fileno(), size, offset)
        except OSError as e:
            raise BadImage(name, f"missing: {e}") from None
        if len(data) < size:
            raise BadImage(name, f"truncated: the shard ends after {len(data)} of the member's {size} bytes")
        return decode_image(io.BytesIO(data), name, size, max_pixels=self.max_pixels, background=self.background)

    def _file(self, shard: int) -> BinaryIO:
        """The open file of shard ``shard``, the most recently used one now."""
        f = self._open_files.pop(shard, None)
        if f is None:
            f = open(self.shards[shard], "rb", buffering=0)
            if len(self._open_files) >= MAX_OPEN_SHARDS:
                self._open_files.popitem(last=False)[1].close()
        self._open_files[shard] = f
        return f


def _members(path: Path) -> List[tarfile.TarInfo]:
    """The members of one shard from its headers; :class:`BadShards` when it is no plain tar."""
    try:
        with tarfile.open(path, mode="r:") as tar:  # "r:": compressed tars have no usable offsets
            return tar.getmembers()
    except tarfile.ReadError as e:
        raise BadShards(f"tar shard {str(path)!r} is not an uncompressed tar archive ({e}); "
                        f"make shards with 'tar cf', without compression") from None
    except OSError as e:
        raise BadShards(f"tar shard {str(path)!r} cannot be read: {e}") from None
