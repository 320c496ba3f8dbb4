"""Hostile image folders: all bad, mostly bad, bombs, empty, symlink loops, every image mode;
calibration draws readable images only and says how many of how many were readable."""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lowres_kd.data import (EvalTransform, FolderSource, NoImages, NotEnoughImages, TrainImages, readable_images)
from lowres_kd.data import sources


def _png_bomb(width=60_000, height=60_000) -> bytes:
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _good(path, mode="RGB"):
    arr = (np.arange(40 * 48 * 3).reshape(40, 48, 3) % 251).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "I;16":
        img = Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16))
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path, "JPEG" if mode == "CMYK" else None)


def _bad(folder, n):
    for i in range(n):
        kind = i % 4
        path = folder / f"bad_{i:02d}.png"
        if kind == 0:
            path.write_bytes(b"")
        elif kind == 1:
            path.write_text("not an image")
        elif kind == 2:
            path.write_bytes(_png_bomb())
        else:
            _good(path)
            path.write_bytes(path.read_bytes()[:60])


def _calibrate(folder, want=8, need=2):
    data = TrainImages(FolderSource(folder), EvalTransform(32))
    skipped = []
    batches = list(readable_images(data, want, need, 3, skipped, what="calibration"))
    return batches, skipped


def test_all_bad_is_a_clean_error_with_counts(tmp_path):
    _bad(tmp_path, 8)
    with pytest.raises(NotEnoughImages, match="only 0 of 8 images are readable, 2 needed"):
        _calibrate(tmp_path)


def test_one_good_among_corrupt_ones(tmp_path):
    _bad(tmp_path, 7)
    _good(tmp_path / "zz_good.png")
    with pytest.raises(NotEnoughImages, match="only 1 of 8 images are readable"):
        _calibrate(tmp_path)


def test_first_images_unreadable_calibration_takes_the_readable_ones(tmp_path):
    _bad(tmp_path, 6)  # sorted first: bad_*
    for i in range(5):
        _good(tmp_path / f"good_{i}.png")
    batches, skipped = _calibrate(tmp_path, want=4)
    assert [len(b) for b in batches] == [3, 1] and all(b.shape[1:] == (3, 32, 32) for b in batches)
    kinds = {r.split(":")[0] for _, r in skipped}
    assert len(skipped) == 6 and {"empty file", "not an image", "too large"} <= kinds


def test_small_pillow_limit_bombs_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own DecompressionBombError, at 2x this
    for i in range(3):
        _good(tmp_path / f"big_{i}.png")
    src = FolderSource(tmp_path)
    with pytest.raises(sources.BadImage, match="too large"):
        src.load(0)


def test_empty_folder_and_other_files_only(tmp_path):
    with pytest.raises(NoImages, match="holds no image file"):
        FolderSource(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NoImages, match="1 other file"):
        FolderSource(tmp_path)


def test_symlink_to_its_own_folder_counts_each_image_once(tmp_path):
    for i in range(3):
        _good(tmp_path / f"img_{i}.png")
    os.symlink(tmp_path, tmp_path / "self")
    os.symlink(tmp_path, tmp_path / "again")
    os.symlink(tmp_path / "img_0.png", tmp_path / "link.png")
    src = FolderSource(tmp_path)
    assert len(src) == 3 and src.links_skipped == 3


def test_symlink_loop_between_two_folders_ends(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _good(tmp_path / "a" / "x.png")
    _good(tmp_path / "b" / "y.png")
    os.symlink(tmp_path / "b", tmp_path / "a" / "to_b")
    os.symlink(tmp_path / "a", tmp_path / "b" / "to_a")
    assert sorted(FolderSource(tmp_path).files) == ["a/x.png", "b/y.png"]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_image_mode_loads_as_rgb(tmp_path, mode):
    _good(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"), mode)
    img = FolderSource(tmp_path).load(0)
    assert img.mode == "RGB" and img.size == (48, 40)
    assert torch.isfinite(EvalTransform(32)(img, torch.Generator())).all()
