"""Image sources: a folder of files, or the real images embedded in installed packages (tar
shards: ``shards.py``; which one a ``data.source`` names: ``source_spec.py``).

A source is a small indexable collection of images with three methods:

* ``len(source)`` - the number of items (fixed at construction),
* ``source.name(i)`` - a stable, human-readable name (a relative path, ``skimage:chelsea``, ...),
* ``source.load(i)`` - the image as an 8-bit ``PIL.Image`` in mode ``RGB``.

``load`` never returns a half-decoded image: an unreadable item raises :class:`BadImage` with the
path and a reason of the form ``"<kind>: <detail>"`` (kinds: ``empty file``, ``not an image``,
``too large``, ``truncated``, ``missing``, ``decode error``). The training dataset turns that into a
skipped item (DESIGN.md section 5: skipped, counted, reported, never a crash mid-epoch).

Colour conversion rules of :func:`decode_image`, which decodes the files of every source that
holds files (a folder, tar shards; all images end up 8-bit RGB):

* ``1``, ``L``: grey replicated to three channels.
* ``I;16`` / ``I;16B`` / ``I;16L`` / ``I;16N`` (16-bit grey): ``round(v / 257)``, so 65535 -> 255
  and the full 16-bit range maps onto the 8-bit range (no clipping).
* ``I`` (32-bit int; older Pillow opens 16-bit PNGs this way): ``v / 257`` when all values lie in
  ``[0, 65535]``, otherwise a min-max stretch of that image.
* ``F`` (float): ``v * 255`` when all values lie in ``[0, 1]``, otherwise a min-max stretch.
* ``P`` (palette, with or without a transparency entry), ``PA``, ``LA``, ``RGBA``, ``La``, ``RGBa``:
  alpha-composited over a **white** background (the default ``background=(255, 255, 255)``;
  transparent pixels of web images and logos are meant to be shown on a light page; pass
  ``background=(0, 0, 0)`` for black).
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion to RGB (no ICC colour management).
* EXIF orientation is applied (a phone photo taken upright comes out upright).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, List, Sequence, Tuple

import numpy as np
import skimage.data
from PIL import Image, ImageOps, UnidentifiedImageError
from sklearn.datasets import load_sample_images

from ..errors import UserError
from . import labelled

__all__ = [
    "BadImage",
    "NoImages",
    "ImageSource",
    "FolderSource",
    "EmbeddedSource",
    "IMAGE_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "SKIMAGE_IMAGES",
    "to_rgb",
    "load_image_file",
    "decode_image",
    "checked_max_pixels",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: Refuse images with more pixels than this (8192 x 8192) *before* decoding them.
DEFAULT_MAX_PIXELS = 8192 * 8192

#: The skimage.data images that ship inside the wheel (others download and fail offline).
SKIMAGE_IMAGES = (
    "astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
    "immunohistochemistry", "camera", "coins", "moon", "page", "text", "brick", "grass",
    "gravel", "cell", "clock", "horse", "logo", "colorwheel", "stereo_motorcycle",
)


class BadImage(Exception):
    """An item that cannot be turned into an RGB image; ``reason`` is ``"<kind>: <detail>"``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0]

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (BadImage, (self.path, self.reason))


class NoImages(UserError, ValueError):
    """A folder that holds no image file (after hidden files, links seen twice and other
    extensions are left out)."""


# --------------------------------------------------------------------------- conversion


def _composite(img: Image.Image, background: Tuple[int, int, int]) -> Image.Image:
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _stretch(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_rgb(img: Image.Image, background: Tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB following the rules in the module docstring."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float64)
        grey = np.round(arr / 257.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "I":
        arr = np.asarray(img).astype(np.float64)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            grey = np.round(arr / 257.0).astype(np.uint8)
        else:
            grey = _stretch(arr)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            grey = np.round(arr * 255.0).astype(np.uint8)
        else:
            grey = _stretch(arr)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P":
        if "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA":
            return _composite(img, background)
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite(img, background)
    if mode in ("L", "1") and "transparency" in img.info:
        return _composite(img, background)
    # L, 1, CMYK, YCbCr, LAB, HSV, RGBX, ...: Pillow's own conversion; one it cannot do raises
    # ValueError, which decode_image reports as a BadImage.
    return img.convert("RGB")


def _array_to_image(arr: np.ndarray, background=(255, 255, 255)) -> Image.Image:
    """An in-memory array (H, W), (H, W, 3) or (H, W, 4), uint8/bool/float, to an RGB image."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.min() >= 0 and arr.max() <= 1:
            arr = np.round(arr * 255).astype(np.uint8)
        else:
            arr = _stretch(arr.astype(np.float64))
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] == 4:
        return _composite(Image.fromarray(arr, "RGBA"), background)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return Image.fromarray(arr, "RGB")
    raise ValueError(f"cannot make an RGB image from an array of shape {arr.shape}")


# --------------------------------------------------------------------------- sources


class ImageSource:
    """Base class: subclasses implement ``__len__``, ``name`` and ``load``."""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def name(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of {n} items")
        return i % n

    def names(self) -> List[str]:
        return [self.name(i) for i in range(len(self))]


class SubsetSource(ImageSource):
    """The items ``indices`` of ``source``, in that order, under their own names: a source split
    into training images and images held out for the probes."""

    def __init__(self, source: ImageSource, indices: Sequence[int]):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"SubsetSource({self.source!r}, {len(self.indices)} of {len(self.source)} items)"

    def name(self, i: int) -> str:
        return self.source.name(self.indices[self._check_index(i)])

    def load(self, i: int) -> Image.Image:
        return self.source.load(self.indices[self._check_index(i)])


class FolderSource(ImageSource):
    """Every image file under ``root`` (recursive, sorted by relative path).

    Extensions: jpg, jpeg, png, webp, bmp, any case. Hidden files and folders (names starting
    with ``.``, e.g. macOS ``._x.jpg`` resource forks) are ignored. Symbolic links are followed
    once: a folder or file reached a second time by its real path (a link to a parent, a loop, two
    links to one place) is left out and counted in ``links_skipped``. A missing folder raises
    ``FileNotFoundError``, a path that is not a folder ``NotADirectoryError``, a folder without
    any image file :class:`NoImages`; each names the path, and all happen in the constructor.

    ``max_pixels``: images whose header declares more pixels are refused (``BadImage``, kind
    ``too large``) before any pixel is decoded. ``background``: colour under transparent pixels.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        background: Tuple[int, int, int] = (255, 255, 255),
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {str(self.root)!r} is not a folder")
        self.max_pixels = checked_max_pixels(max_pixels)
        self.background = tuple(int(c) for c in background)
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        files, others, self.links_skipped = scan_folder(self.root, exts)
        if not files:
            raise NoImages(
                f"image folder {str(self.root)!r} holds no image file "
                f"({', '.join(exts)}; {others} other file(s) found); put images in it or point data.source elsewhere"
            )
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r}, {len(self)} files)"

    def name(self, i: int) -> str:
        return self.files[self._check_index(i)]

    def path(self, i: int) -> Path:
        return self.root / self.files[self._check_index(i)]

    def load(self, i: int) -> Image.Image:
        path = self.path(i)
        return load_image_file(path, max_pixels=self.max_pixels, background=self.background)


def scan_folder(root: Path, exts: Sequence[str] = IMAGE_EXTENSIONS) -> Tuple[List[str], int, int]:
    """``(image files relative to root, sorted; other files; links skipped)``. Links are followed,
    but every folder and file is taken once by its real path, so a loop ends and a folder linked
    twice counts once; names are visited in sorted order, so which name is kept is fixed."""
    files: List[str] = []
    others = skipped = 0
    seen_dirs = {os.path.realpath(root)}
    seen_files = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in seen_dirs:
                skipped += 1
                continue
            seen_dirs.add(real)
            keep.append(d)
        dirnames[:] = keep
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            if os.path.splitext(fn)[1].lower() not in exts:
                others += 1
                continue
            full = os.path.join(dirpath, fn)
            real = os.path.realpath(full)
            if real in seen_files:
                skipped += 1
                continue
            seen_files.add(real)
            files.append(Path(os.path.relpath(full, root)).as_posix())
    return sorted(files), others, skipped


def checked_max_pixels(max_pixels: int) -> int:
    """``max_pixels`` of a source that decodes files, refused unless positive (0 would refuse every image)."""
    if int(max_pixels) <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    return int(max_pixels)


def load_image_file(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: Tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Decode one file to 8-bit RGB or raise :class:`BadImage` saying why not."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            return decode_image(f, path, size, max_pixels=max_pixels, background=background)
    except FileNotFoundError:
        raise BadImage(path, "missing: the file disappeared after the folder was scanned") from None
    except OSError as e:
        raise BadImage(path, f"missing: {e}") from None


def decode_image(
    stream: BinaryIO,
    name: str,
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: Tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Decode the ``size`` bytes of one image file read from ``stream`` (a file on disk, a tar
    member) to 8-bit RGB, or raise :class:`BadImage` under ``name``: every source that holds
    files decodes them here, so they all follow the same colour rules and limits."""
    if size == 0:
        raise BadImage(name, "empty file: 0 bytes")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's warning below its hard limit is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(stream)
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(name, f"too large: {w}x{h} = {w * h} pixels > limit {max_pixels}")
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block is not a broken image
                pass
            return to_rgb(img, background)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(name, f"too large: {e}") from None
    except UnidentifiedImageError:
        raise BadImage(name, f"not an image: Pillow cannot identify the format ({size} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
            MemoryError, RuntimeError) as e:
        msg = str(e) or type(e).__name__
        kind = "truncated" if "truncat" in msg.lower() or isinstance(e, EOFError) else "decode error"
        raise BadImage(name, f"{kind}: {msg}") from None


def _skimage_loader(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        out = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            out = out[0]  # (left view, right view, disparity)
        return out

    return load


def _sklearn_sample_images() -> List[Tuple[str, np.ndarray]]:
    bunch = load_sample_images()
    return [(Path(fn).stem, img) for fn, img in zip(bunch.filenames, bunch.images)]


class EmbeddedSource(ImageSource):
    """The real photographs that ship inside installed packages; needs no folder and no network.

    * every image of :data:`SKIMAGE_IMAGES` that loads (``skimage:<name>``; the motorcycle is
      ``skimage:motorcycle_left``, the left view of ``stereo_motorcycle``); those that fail are
      listed in ``skipped``;
    * scikit-learn's ``load_sample_images`` (``sklearn:china``, ``sklearn:flower``);
    * the first ``fashion_mnist`` Fashion-MNIST training images (``fashion_mnist:train/<k>``,
      kept at 28x28; the transform resizes) when the Debian ``dataset-fashion-mnist`` files
      exist; otherwise none, with a one-line warning.

    Everything is decoded once in the constructor and kept in memory as uint8 arrays (about
    25 MB); ``loaded`` lists the names that made it.
    """

    def __init__(self, fashion_mnist: int = 64, fmnist_dir: str | os.PathLike | None = None):
        if int(fashion_mnist) < 0:
            raise ValueError(f"fashion_mnist must be >= 0, got {fashion_mnist}")
        self._names: List[str] = []
        self._arrays: List[np.ndarray] = []
        self.skipped: List[Tuple[str, str]] = []
        for name in SKIMAGE_IMAGES:
            shown = "motorcycle_left" if name == "stereo_motorcycle" else name
            self._try(f"skimage:{shown}", _skimage_loader(name))
        try:
            for stem, arr in _sklearn_sample_images():
                self._try(f"sklearn:{stem}", lambda a=arr: a)
        except Exception as e:  # pragma: no cover - depends on the installation
            self.skipped.append(("sklearn:load_sample_images", f"{type(e).__name__}: {e}"))
        self.fashion_mnist = 0
        if fashion_mnist:
            folder = Path(fmnist_dir) if fmnist_dir is not None else labelled.fashion_mnist_dir()
            if labelled.fashion_mnist_available(folder):
                imgs = labelled.read_idx_images(folder / labelled.FMNIST_FILES["train_images"],
                                                count=int(fashion_mnist))
                for k, arr in enumerate(imgs):
                    self._names.append(f"fashion_mnist:train/{k}")
                    self._arrays.append(np.ascontiguousarray(arr))
                self.fashion_mnist = len(imgs)
            else:
                warnings.warn(
                    f"EmbeddedSource: Fashion-MNIST files not found in {str(folder)!r} "
                    f"(Debian package dataset-fashion-mnist); using {len(self._names)} "
                    f"skimage/sklearn images only",
                    stacklevel=2,
                )
        if not self._names:
            raise ValueError("EmbeddedSource: no embedded image could be loaded "
                             f"(failures: {self.skipped})")

    def _try(self, name: str, fn: Callable[[], np.ndarray]) -> None:
        try:
            arr = np.asarray(fn())
            img = _array_to_image(arr)
            self._arrays.append(np.asarray(img))
            self._names.append(name)
        except Exception as e:
            self.skipped.append((name, f"{type(e).__name__}: {e}"))

    @property
    def loaded(self) -> List[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return (f"EmbeddedSource({len(self)} images: {len(self) - self.fashion_mnist} "
                f"photos, {self.fashion_mnist} Fashion-MNIST; {len(self.skipped)} failed)")

    def name(self, i: int) -> str:
        return self._names[self._check_index(i)]

    def load(self, i: int) -> Image.Image:
        arr = self._arrays[self._check_index(i)]
        if arr.ndim == 2:
            return Image.fromarray(arr, "L").convert("RGB")
        return Image.fromarray(arr, "RGB")
