"""lowres_kd.data: sources, bad files, deterministic transforms, resumable loading, labelled sets."""
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, features

from lowres_kd.data import (
    BadImage,
    BadImageReport,
    EmbeddedSource,
    EvalTransform,
    FolderSource,
    ResumableSampler,
    Skipped,
    TrainImages,
    TrainTransform,
    build_source,
    collate_images,
    load_labelled,
    make_train_loader,
    start_epoch,
)
from lowres_kd.data import labelled as labelled_mod

# --------------------------------------------------------------------------- fixtures


def _photo(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.int32)
    arr = arr + rng.integers(0, 20, size=arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG header declaring a huge image, followed by a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


GOOD = [
    "a_rgb.jpg", "b_rgb.png", "c_gray.png", "d_rgba.png", "e_palette.png", "f_16bit.png",
    "g_cmyk.jpg", "h.bmp", "sub/UPPER.JPG",
]
BAD = {
    "bad/trunc.jpg": "truncated",
    "bad/zero.png": "empty file",
    "bad/text.png": "not an image",
    "bad/bomb.png": "too large",
}
G16 = np.array([[0, 257, 1000, 25700], [32896, 50000, 65278, 65535]], dtype=np.uint16)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / "bad").mkdir()
    (root / ".hidden").mkdir()
    photo = _photo()
    Image.fromarray(photo).save(root / "a_rgb.jpg", quality=90)
    Image.fromarray(photo).save(root / "b_rgb.png")
    Image.fromarray(photo[..., 0]).save(root / "c_gray.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (0, 0, 255, 255)      # opaque blue
    rgba[4:] = (255, 0, 0, 0)        # fully transparent red -> background
    rgba[6:, :4] = (0, 0, 0, 128)    # half-transparent black over white -> ~127
    Image.fromarray(rgba, "RGBA").save(root / "d_rgba.png")
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 255, 0, 10, 20, 30] + [0] * (254 * 3))
    pal.paste(1, (0, 0, 8, 4))
    pal.save(root / "e_palette.png", transparency=1)  # index 1 transparent
    Image.fromarray(G16).save(root / "f_16bit.png")
    Image.fromarray(photo).convert("CMYK").save(root / "g_cmyk.jpg")
    Image.fromarray(photo).save(root / "h.bmp")
    Image.fromarray(photo).save(root / "sub" / "UPPER.JPG")
    if features.check("webp"):
        Image.fromarray(photo).save(root / "c_web.webp")
    full = (root / "a_rgb.jpg").read_bytes()
    (root / "bad" / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (root / "bad" / "zero.png").write_bytes(b"")
    (root / "bad" / "text.png").write_text("this is not a picture\n" * 20)
    (root / "bad" / "bomb.png").write_bytes(_bomb_png())
    (root / "notes.txt").write_text("ignored")
    Image.fromarray(photo).save(root / ".hidden" / "x.jpg")
    Image.fromarray(photo).save(root / "._resource.jpg")
    return root


def _rng_states():
    return torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy()


def _same_rng(a, b):
    return torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


# --------------------------------------------------------------------------- sources


def test_folder_source_scan_and_conversions(image_folder):
    src = FolderSource(image_folder)
    names = src.names()
    assert names == sorted(names)
    expected = set(GOOD) | set(BAD) | ({"c_web.webp"} if features.check("webp") else set())
    assert set(names) == expected  # hidden files/folders and .txt ignored
    for n in expected - set(BAD):
        img = src.load(names.index(n))
        assert img.mode == "RGB" and img.size[0] > 0, n
    # 16-bit: v / 257 rounded, full range kept (65535 -> 255, not clipped at 255 raw)
    g16 = np.asarray(src.load(names.index("f_16bit.png")))
    assert np.array_equal(g16[..., 0], np.round(G16 / 257.0).astype(np.uint8))
    assert np.array_equal(g16[..., 0], g16[..., 2])
    assert g16[1, 3, 0] == 255 and g16[0, 1, 0] == 1 and g16[0, 3, 0] == 100
    # RGBA composited on white
    rgba = np.asarray(src.load(names.index("d_rgba.png")))
    assert tuple(rgba[0, 0]) == (0, 0, 255)
    assert tuple(rgba[4, 7]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in rgba[7, 0])
    # palette with a transparent index -> white there, palette colour elsewhere
    pal = np.asarray(src.load(names.index("e_palette.png")))
    assert tuple(pal[0, 0]) == (255, 255, 255) and tuple(pal[7, 7]) == (0, 255, 0)
    gray = np.asarray(src.load(names.index("c_gray.png")))
    assert np.array_equal(gray[..., 0], gray[..., 1])


def test_folder_source_bad_files_report_reasons(image_folder):
    src = FolderSource(image_folder)
    names = src.names()
    for n, kind in BAD.items():
        with pytest.raises(BadImage) as info:
            src.load(names.index(n))
        assert info.value.kind == kind, (n, info.value.reason)
        assert info.value.path.endswith(n)
    # a lowered pixel limit refuses a real image before decoding it
    small = FolderSource(image_folder, max_pixels=100)
    with pytest.raises(BadImage, match="too large"):
        small.load(names.index("b_rgb.png"))


def test_folder_source_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FolderSource(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty"):
        FolderSource(empty)
    with pytest.raises(FileNotFoundError):
        build_source(str(tmp_path / "nowhere"))


@pytest.fixture(scope="module")
def embedded():
    return EmbeddedSource(fashion_mnist=4)


def test_embedded_source(embedded):
    photos = [n for n in embedded.loaded if not n.startswith("fashion_mnist")]
    assert len(photos) >= 20, embedded.skipped
    assert "skimage:chelsea" in photos and "sklearn:china" in photos
    assert "skimage:motorcycle_left" in photos
    for i in range(len(embedded)):
        img = embedded.load(i)
        assert img.mode == "RGB" and min(img.size) >= 8
    if labelled_mod.fashion_mnist_available():
        assert embedded.fashion_mnist == 4
        fm = embedded.load(embedded.loaded.index("fashion_mnist:train/0"))
        assert fm.size == (28, 28)
        first = labelled_mod.read_idx_images(
            labelled_mod.fashion_mnist_dir() / labelled_mod.FMNIST_FILES["train_images"], 1)[0]
        assert np.array_equal(np.asarray(fm)[..., 0], first)


def test_embedded_without_fashion_mnist_warns(monkeypatch, tmp_path):
    monkeypatch.setattr(labelled_mod, "FASHION_MNIST_DIR", tmp_path / "missing")
    with pytest.warns(UserWarning, match="Fashion-MNIST files not found"):
        src = build_source("embedded", fashion_mnist=8)
    assert isinstance(src, EmbeddedSource) and src.fashion_mnist == 0
    assert len(src) >= 20 and not any(n.startswith("fashion_mnist") for n in src.loaded)


# --------------------------------------------------------------------------- transforms


def test_transforms_deterministic_and_global_rng_untouched(embedded):
    img = embedded.load(embedded.loaded.index("skimage:chelsea"))
    tf = TrainTransform(32)
    before = _rng_states()
    a = tf(img, torch.Generator().manual_seed(5))
    b = tf(img, torch.Generator().manual_seed(5))
    c = tf(img, torch.Generator().manual_seed(6))
    ev1, ev2 = EvalTransform(32)(img), EvalTransform(32)(img)
    assert _same_rng(before, _rng_states())
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(ev1, ev2) and ev1.shape == (3, 32, 32)
    with pytest.raises(TypeError):
        tf(img, None)
    with pytest.raises(ValueError):
        TrainTransform(32, scale=(0.5, 0.2))


# --------------------------------------------------------------------------- dataset / loader


def test_dataset_determinism_per_seed_epoch_index(embedded):
    ds1 = TrainImages(embedded, TrainTransform(24), seed=3)
    ds2 = TrainImages(embedded, TrainTransform(24), seed=3)
    before = _rng_states()
    ds1.set_epoch(2)
    ds2.set_epoch(2)
    x = ds1[1]
    assert torch.equal(x, ds2[1]) and torch.equal(x, ds1[1])
    ds2.set_epoch(3)
    assert not torch.equal(x, ds2[1])  # another epoch, another crop
    other_seed = TrainImages(embedded, TrainTransform(24), seed=4)
    other_seed.set_epoch(2)
    assert not torch.equal(x, other_seed[1])
    assert _same_rng(before, _rng_states())


def test_loader_skips_bad_files_and_reports(image_folder):
    src = FolderSource(image_folder)
    ds = TrainImages(src, TrainTransform(16), seed=0)
    sampler = ResumableSampler(len(ds), seed=0)
    loader = make_train_loader(ds, batch_size=4, sampler=sampler, drop_last=False)
    report = BadImageReport(epoch=0)
    before = _rng_states()
    n_img = 0
    for images, skipped in loader:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16)
        report.update(images.shape[0], skipped)
        n_img += images.shape[0]
    assert _same_rng(before, _rng_states())  # the loader has its own generator
    assert n_img == len(src) - len(BAD)
    assert report.count == len(BAD)
    assert sorted(report.kinds().elements()) == sorted(BAD.values())
    line = report.summary()
    assert "\n" not in line and f"{len(BAD)} of {len(src)}" in line
    assert any("trunc.jpg" in l and "truncated" in l for l in report.lines())
    assert len(ds.skipped) == len(BAD)


def test_collate_all_bad_batch():
    images, skipped = collate_images([Skipped("x.png", "empty file: 0 bytes"), None], size=8)
    assert images.shape == (0, 3, 8, 8) and len(skipped) == 2
    images, skipped = collate_images([torch.zeros(3, 8, 8), Skipped("y", "truncated: z")])
    assert images.shape == (1, 3, 8, 8) and skipped == [("y", "truncated: z")]


def test_sampler_order_and_start_at():
    s = ResumableSampler(50, seed=7)
    s.set_epoch(3)
    full = list(s)
    assert sorted(full) == list(range(50))
    assert full == ResumableSampler(50, seed=7).order(3)
    s.set_epoch(4)
    assert list(s) != full
    s.set_epoch(3)
    s.start_at(20)
    assert list(s) == full[20:] and len(s) == 30
    state = s.state_dict()
    s2 = ResumableSampler(50, seed=7)
    s2.load_state_dict(state)
    assert list(s2) == full[20:]
    s.set_epoch(3)
    assert list(s) == full  # set_epoch clears the resume offset
    assert list(ResumableSampler(5, seed=0, shuffle=False)) == [0, 1, 2, 3, 4]


def test_resumed_loader_sees_the_same_batches(embedded):
    def run(batches_done, num_workers=0):
        ds = TrainImages(embedded, TrainTransform(16), seed=11)
        loader = make_train_loader(ds, 4, ResumableSampler(len(ds), seed=11),
                                   num_workers=num_workers)
        start_epoch(loader, 1, batches_done)
        return [b for b, _ in loader]

    full = run(0)
    assert len(full) == len(embedded) // 4  # drop_last
    resumed = run(3)
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed))
    workers = run(3, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(resumed, workers))


# --------------------------------------------------------------------------- labelled sets


@pytest.mark.skipif(not labelled_mod.fashion_mnist_available(),
                    reason="Debian dataset-fashion-mnist files not installed")
def test_load_labelled_fashion_mnist():
    split = load_labelled("fashion_mnist", n_train=200, n_test=100, seed=1)
    assert split.name == "fashion_mnist" and len(split.classes) == 10
    assert split.train_images.shape == (200, 28, 28, 3) and split.train_images.dtype == np.uint8
    assert split.test_images.shape == (100, 28, 28, 3)
    assert split.train_labels.dtype == np.int64
    assert np.array_equal(np.bincount(split.train_labels), [20] * 10)
    assert np.array_equal(np.bincount(split.test_labels), [10] * 10)
    assert np.array_equal(split.train_images[..., 0], split.train_images[..., 2])
    folder = labelled_mod.fashion_mnist_dir()
    files = labelled_mod.FMNIST_FILES
    # train rows come from the train file, test rows from the t10k file
    ti = split.extra["train_index"]
    raw = labelled_mod.read_idx_images(folder / files["train_images"], int(ti.max()) + 1)
    assert np.array_equal(raw[ti], split.train_images[..., 0])
    te = split.extra["test_index"]
    raw_t = labelled_mod.read_idx_images(folder / files["test_images"], int(te.max()) + 1)
    lab_t = labelled_mod.read_idx_labels(folder / files["test_labels"])
    assert np.array_equal(raw_t[te], split.test_images[..., 0])
    assert np.array_equal(lab_t[te], split.test_labels)
    again = load_labelled("fashion_mnist", n_train=200, n_test=100, seed=1)
    assert np.array_equal(again.train_images, split.train_images)
    other = load_labelled("fashion_mnist", n_train=200, n_test=100, seed=2)
    assert not np.array_equal(other.extra["train_index"], ti)


def test_load_labelled_falls_back_to_digits(monkeypatch, tmp_path):
    monkeypatch.setattr(labelled_mod, "FASHION_MNIST_DIR", tmp_path / "missing")
    before = _rng_states()
    with pytest.warns(UserWarning, match="using the 'digits' set instead"):
        split = load_labelled("fashion_mnist", n_train=300, n_test=100, seed=0)
    assert _same_rng(before, _rng_states())
    assert split.name == "digits" and "digits" in split.note
    assert split.train_images.shape == (300, 8, 8, 3) and split.test_images.shape == (100, 8, 8, 3)
    assert split.train_images.dtype == np.uint8 and split.train_images.max() == 255
    assert np.array_equal(np.bincount(split.test_labels), [10] * 10)
    assert not set(split.extra["train_index"]) & set(split.extra["test_index"])
    # sizes meant for Fashion-MNIST are clipped, and the warning says so
    with pytest.warns(UserWarning, match="clipped"):
        big = load_labelled("fashion_mnist", n_train=5000, n_test=2000)
    assert len(big.train_labels) + len(big.test_labels) <= 1797


def test_load_labelled_digits_direct():
    split = load_labelled("digits", n_train=500, n_test=200, seed=3)
    assert split.name == "digits" and split.classes == [str(d) for d in range(10)]
    assert not set(split.extra["train_index"]) & set(split.extra["test_index"])
    assert np.array_equal(np.bincount(split.train_labels), [50] * 10)
    with pytest.raises(ValueError):
        load_labelled("digits", n_train=1700, n_test=500)
    with pytest.raises(ValueError, match="unknown labelled set"):
        load_labelled("cifar10")
