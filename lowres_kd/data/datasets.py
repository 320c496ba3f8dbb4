"""The training dataset, its resumable sampler, the collate function and the bad-image report.

Determinism: item ``i`` at epoch ``e`` is a pure function of ``(seed, e, i)`` (one private
``torch.Generator`` per item), and the order of epoch ``e`` is a pure function of
``(seed, e)``. With ``ResumableSampler.start_at(k)`` a resumed run sees exactly the batches the
uninterrupted run would have seen, whatever the number of DataLoader workers.

Bad data (DESIGN.md section 5): an unreadable item does not raise. ``TrainImages[i]`` returns a
:class:`Skipped` record ``(name, reason)`` instead of a tensor (a bare ``None`` would lose the
file's name on its way back from a worker process); :func:`collate_images` drops the records
(and any ``None``) and hands them back next to the batch; :class:`BadImageReport` counts them
over an epoch and prints a one-line summary plus the list.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UserError
from .sources import BadImage, ImageSource

__all__ = [
    "mix_seed",
    "Skipped",
    "TrainImages",
    "collate_images",
    "ResumableSampler",
    "make_train_loader",
    "Indexed",
    "collate_indexed",
    "start_epoch",
    "BadImageReport",
    "NotEnoughImages",
    "readable_images",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """Hash integers into one 63-bit seed (order matters; no RNG is touched)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


class Skipped(NamedTuple):
    """What a dataset returns instead of a tensor for an unreadable item."""

    name: str
    reason: str


class TrainImages(Dataset):
    """``source`` items through ``transform(img, generator)``, seeded per (seed, epoch, index).

    ``skipped`` collects the ``Skipped`` records produced in *this* process (with worker
    processes, use the list that :func:`collate_images` returns instead).
    """

    _SALT = 0x7EA1  # separates the item streams from the sampler's

    def __init__(self, source: ImageSource, transform, seed: int = 0):
        if len(source) == 0:
            raise ValueError("TrainImages: the image source is empty")
        self.source = source
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.skipped: List[Skipped] = []

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def generator(self, index: int, epoch: Optional[int] = None) -> torch.Generator:
        e = self.epoch if epoch is None else int(epoch)
        g = torch.Generator()
        g.manual_seed(mix_seed(self.seed, self._SALT, e, int(index)))
        return g

    def __getitem__(self, index: int):
        try:
            img = self.source.load(index)
        except BadImage as e:
            item = Skipped(e.path or self.source.name(index), e.reason)
            self.skipped.append(item)
            return item
        return self.transform(img, self.generator(index))

    @property
    def size(self) -> Optional[int]:
        return getattr(self.transform, "size", None)


def collate_images(batch: Sequence, size: Optional[int] = None
                   ) -> Tuple[torch.Tensor, List[Tuple[str, str]]]:
    """Stack the tensors of ``batch``; return ``(images (B, 3, S, S), [(name, reason), ...])``.

    ``Skipped`` records and ``None`` items are dropped and listed. A batch in which every item
    was bad gives an empty tensor ``(0, 3, size, size)`` (``(0, 3, 0, 0)`` when ``size`` is not
    known); the caller should skip that step.
    """
    good: List[torch.Tensor] = []
    skipped: List[Tuple[str, str]] = []
    for item in batch:
        if item is None:
            skipped.append(("<unknown>", "unreadable: the dataset returned None"))
        elif isinstance(item, Skipped):
            skipped.append((item.name, item.reason))
        else:
            good.append(item)
    if good:
        return torch.stack(good, 0), skipped
    s = int(size) if size else 0
    return torch.empty((0, 3, s, s), dtype=torch.float32), skipped


class NotEnoughImages(UserError, ValueError):
    """Fewer readable images than a pass needs; the message says how many of how many."""


def readable_images(dataset: Dataset, want: int, need: int, batch_size: int, skipped: List[Tuple[str, str]],
                    what: str = "images") -> Iterator[torch.Tensor]:
    """Batches (never empty) of the first ``want`` readable items of ``dataset`` in index order;
    unreadable ones are passed over and appended to ``skipped`` as ``(name, reason)``. Raises
    :class:`NotEnoughImages` when the dataset ends with fewer than ``need`` readable, saying how
    many of how many were."""
    good: List[torch.Tensor] = []
    seen = done = 0
    for i in range(len(dataset)):
        if done + len(good) >= want:
            break
        item = dataset[i]
        seen += 1
        if item is None or isinstance(item, Skipped):
            skipped.append(("<unknown>", "unreadable: the dataset returned None") if item is None
                           else (item.name, item.reason))
            continue
        good.append(item)
        if len(good) == batch_size:
            done += len(good)
            yield torch.stack(good, 0)
            good = []
    if done + len(good) < need:
        raise NotEnoughImages(
            f"{what}: only {done + len(good)} of {seen} images are readable, {need} needed (the unreadable ones "
            f"are listed in bad_images.log); add readable images or lower the count")
    if good:
        yield torch.stack(good, 0)


class ResumableSampler(Sampler[int]):
    """A per-epoch permutation of ``range(n)`` fixed by ``(seed, epoch)``, resumable mid-epoch.

    ``start_at(k)`` makes the next iteration skip the first ``k`` indices of the current epoch
    (``k = batches_done * batch_size``); ``set_epoch`` clears it. The sampler uses its own
    generator, never the global one.
    """

    _SALT = 0x5A3B

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        if int(n) <= 0:
            raise ValueError(f"ResumableSampler needs n > 0, got {n}")
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.epoch = 0
        self.start = 0
        self.rank, self.world_size, self.batch_size = 0, 1, 1

    def shard(self, rank: int, world_size: int, batch_size: int) -> "ResumableSampler":
        """Make this rank's sampler: of every global batch of ``world_size * batch_size`` items in
        the epoch's order, rank r gets the r-th slice of ``batch_size``; an incomplete last global
        batch is dropped. ``start_at`` then counts items of the whole run, not of this rank."""
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"shard({rank}, {world_size}, {batch_size}): need 0 <= rank < world_size, batch_size >= 1")
        self.rank, self.world_size, self.batch_size = int(rank), int(world_size), int(batch_size)
        return self

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch, self.start = int(epoch), 0

    def start_at(self, k: int) -> None:
        if not 0 <= int(k) <= self.n:
            raise ValueError(f"start_at({k}) outside [0, {self.n}]")
        self.start = int(k)

    def order(self, epoch: Optional[int] = None) -> List[int]:
        """The full order of an epoch (ignores ``start``)."""
        e = self.epoch if epoch is None else int(epoch)
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(mix_seed(self.seed, self._SALT, e))
        return torch.randperm(self.n, generator=g).tolist()

    def _mine(self) -> List[int]:
        items = self.order()[self.start:]
        if self.world_size == 1:
            return items
        step, bs = self.world_size * self.batch_size, self.batch_size
        return [i for b in range(0, len(items) - step + 1, step) for i in items[b + self.rank * bs:b + (self.rank + 1) * bs]]

    def __iter__(self) -> Iterator[int]:
        return iter(self._mine())

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.n - self.start
        return (self.n - self.start) // (self.world_size * self.batch_size) * self.batch_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "n": self.n,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler "
                                 f"{getattr(self, key)!r}")
        self.set_epoch(state["epoch"])
        self.start_at(state["start"])


class Indexed(Dataset):
    """``dataset`` whose good items come with their index: ``(index, tensor)``; ``Skipped``
    records pass through. Training from a target cache needs to know which rows to read."""

    def __init__(self, dataset: TrainImages):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def size(self) -> Optional[int]:
        return self.dataset.size

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return item if item is None or isinstance(item, Skipped) else (int(index), item)


def collate_indexed(batch: Sequence, size: Optional[int] = None
                    ) -> Tuple[torch.Tensor, List[Tuple[str, str]], torch.Tensor]:
    """:func:`collate_images` for :class:`Indexed` items; also returns the good items' indices."""
    good = [b for b in batch if b is not None and not isinstance(b, Skipped)]
    images, skipped = collate_images([b if b is None or isinstance(b, Skipped) else b[1] for b in batch], size)
    return images, skipped, torch.tensor([b[0] for b in good], dtype=torch.long)


def make_train_loader(dataset: TrainImages, batch_size: int, sampler: ResumableSampler,
                      num_workers: int = 0, drop_last: bool = True, collate=collate_images, **kwargs) -> DataLoader:
    """A DataLoader over ``dataset`` in ``sampler`` order that yields ``(images, skipped)``.

    The loader gets its own ``torch.Generator`` (DataLoader draws a base seed at every
    ``iter()``; without one it would consume the global RNG). Extra keyword arguments go to
    ``DataLoader`` (e.g. ``pin_memory``).
    """
    if int(batch_size) <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(dataset) != sampler.n:
        raise ValueError(f"sampler covers {sampler.n} items, dataset has {len(dataset)}")
    g = torch.Generator()
    g.manual_seed(mix_seed(sampler.seed, 0x10AD))
    collate = functools.partial(collate, size=getattr(dataset, "size", None))
    return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler,
                      num_workers=int(num_workers), drop_last=drop_last, collate_fn=collate,
                      generator=g, persistent_workers=False, **kwargs)


def start_epoch(loader: DataLoader, epoch: int, batches_done: int = 0) -> None:
    """Point the loader's dataset and sampler at ``epoch``, skipping ``batches_done`` batches."""
    loader.dataset.set_epoch(epoch)
    loader.sampler.set_epoch(epoch)
    if batches_done:
        loader.sampler.start_at(int(batches_done) * int(loader.batch_size) * loader.sampler.world_size)


class BadImageReport:
    """Accumulates skipped items over an epoch: ``update(n_ok, skipped)``, ``summary()``, ``lines()``."""

    def __init__(self, epoch: Optional[int] = None):
        self.reset(epoch)

    def reset(self, epoch: Optional[int] = None) -> None:
        self.epoch = epoch
        self.ok = 0
        self.items: List[Tuple[str, str]] = []

    def update(self, n_ok: int, skipped: Sequence[Tuple[str, str]]) -> None:
        self.ok += int(n_ok)
        self.items.extend((str(n), str(r)) for n, r in skipped)

    @property
    def count(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:  # a report with nothing in it is still a report
        return True

    def kinds(self) -> Counter:
        return Counter(r.split(":", 1)[0] for _, r in self.items)

    def summary(self) -> str:
        where = f"epoch {self.epoch}: " if self.epoch is not None else ""
        total = self.ok + self.count
        if not self.items:
            return f"{where}0 of {total} images unreadable"
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds().items()))
        return f"{where}{self.count} of {total} images unreadable and skipped ({kinds})"

    def lines(self) -> List[str]:
        return [f"{name}: {reason}" for name, reason in self.items]

    def format(self) -> str:
        return "\n".join([self.summary()] + ["  " + line for line in self.lines()])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "ok": self.ok, "items": [list(t) for t in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.ok = state.get("epoch"), int(state["ok"])
        self.items = [(str(n), str(r)) for n, r in state["items"]]
