"""Deterministic image transforms: PIL RGB image -> float32 tensor (3, size, size) in [0, 1].

``TrainTransform`` draws every random number from the ``torch.Generator`` it is given (never the
global torch / python / numpy RNG), so a dataset that seeds one generator per (seed, epoch, index)
reproduces every crop exactly, also after a resume and in any DataLoader worker.

Resampling is Pillow's bilinear filter, whose support widens when downscaling (i.e. antialiased),
applied to the crop box directly (``Image.resize(box=...)``), so a large photo is never first
decoded to a big intermediate tensor.
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import numpy as np
import torch
from PIL import Image

__all__ = ["TrainTransform", "EvalTransform", "pil_to_tensor01", "random_resized_crop_box"]

ImageLike = Union[Image.Image, np.ndarray]


def _as_rgb_image(img: ImageLike) -> Image.Image:
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected a PIL image or a uint8 array, got an array of {arr.dtype}")
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] == 3:
        return Image.fromarray(arr, "RGB")
    raise TypeError(f"expected (H, W) or (H, W, 3) uint8, got shape {arr.shape}")


def pil_to_tensor01(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [0, 1]."""
    arr = np.array(img, dtype=np.uint8)  # a writable copy
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return t.to(torch.float32).div_(255.0).contiguous()


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)


def random_resized_crop_box(width: int, height: int, scale: Tuple[float, float],
                            ratio: Tuple[float, float], generator: torch.Generator,
                            attempts: int = 10) -> Tuple[int, int, int, int]:
    """A (left, top, crop_w, crop_h) box covering ``scale`` of the area at aspect ``ratio``.

    Up to ``attempts`` candidates (area fraction uniform in ``scale``, log aspect uniform in
    ``log(ratio)``); the first that fits is used. If none fits, the largest centred box whose
    aspect is within ``ratio`` is used. All draws come from ``generator``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    # Fallback: centre crop with the aspect clamped into the allowed range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """Random resized crop (+ optional horizontal flip) to ``size`` x ``size``.

    ``scale``: range of the crop's area as a fraction of the image; ``ratio``: range of the
    crop's width/height. ``__call__(img, generator)`` needs an explicit ``torch.Generator``.
    """

    def __init__(self, size: int, scale: Tuple[float, float] = (0.35, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True):
        self.size = _check_size(size)
        scale = tuple(float(s) for s in scale)
        ratio = tuple(float(r) for r in ratio)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale}")
        if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be (lo, hi) with 0 < lo <= hi, got {ratio}")
        self.scale, self.ratio, self.hflip = scale, ratio, bool(hflip)

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, scale={self.scale}, ratio="
                f"({self.ratio[0]:.4g}, {self.ratio[1]:.4g}), hflip={self.hflip})")

    def params(self, width: int, height: int, generator: torch.Generator):
        """The random choices for one image: ((left, top, w, h), flip)."""
        box = random_resized_crop_box(width, height, self.scale, self.ratio, generator)
        flip = bool(torch.rand((), generator=generator) < 0.5) if self.hflip else False
        return box, flip

    def __call__(self, img: ImageLike, generator: torch.Generator) -> torch.Tensor:
        if not isinstance(generator, torch.Generator):
            raise TypeError("TrainTransform needs an explicit torch.Generator (the global RNG "
                            "is never used)")
        img = _as_rgb_image(img)
        (left, top, w, h), flip = self.params(img.width, img.height, generator)
        out = img.resize((self.size, self.size), Image.Resampling.BILINEAR,
                         box=(left, top, left + w, top + h))
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor01(out)


class EvalTransform:
    """Resize the shorter side to ``round(size / crop_fraction)``, then centre-crop ``size``.

    No randomness. ``crop_fraction=1.0`` (default) keeps the whole shorter side.
    """

    def __init__(self, size: int, crop_fraction: float = 1.0):
        self.size = _check_size(size)
        if not 0.0 < float(crop_fraction) <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.crop_fraction = float(crop_fraction)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, crop_fraction={self.crop_fraction})"

    def __call__(self, img: ImageLike, generator: torch.Generator | None = None) -> torch.Tensor:
        img = _as_rgb_image(img)
        short = max(self.size, int(round(self.size / self.crop_fraction)))
        W, H = img.size
        if W <= H:
            nw, nh = short, max(short, int(round(H * short / W)))
        else:
            nw, nh = max(short, int(round(W * short / H))), short
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return pil_to_tensor01(img)
