"""Labelled folders for the probes, written by the tests: both classification layouts, the
segmentation layout, and every bad case named by its file."""
import numpy as np
import pytest
from PIL import Image

from lowres_kd.data import BadProbeFolder, load_class_folder, load_probe_set, load_segmentation_folder
from lowres_kd.errors import UserError
from lowres_kd.schema import ProbeConfig


def write_image(path, value, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def class_folder(root, layout):
    """Class c's images are all grey level 40 * (c + 1), so labels can be read off the pixels."""
    for c, name in enumerate(["cat", "dog", "emu"]):
        for i in range(5):
            split = "" if layout == "flat" else ("train/" if i < 3 else "val/")
            write_image(root / f"{split}{name}/{i}.jpg" if split else root / name / f"{i}.png", 40 * (c + 1))
    return root


def grey_labels(images, labels):
    return np.round(images[:, 0, 0, 0] / 40).astype(int) - 1, labels


@pytest.mark.parametrize("layout", ["train_val", "flat"])
def test_class_folder_layouts(tmp_path, layout):
    root = class_folder(tmp_path / "pets", layout)
    split = load_class_folder(root, 12, train_per_class=10, test_per_class=10, val_fraction=0.4, seed=0)
    assert split.classes == ["cat", "dog", "emu"] and split.kind == "classification"
    assert split.train_images.shape == (9, 12, 12, 3) and split.test_images.shape == (6, 12, 12, 3)
    for images, labels in ((split.train_images, split.train_labels), (split.test_images, split.test_labels)):
        seen, labels = grey_labels(images, labels)
        assert (seen == labels).all()
    capped = load_class_folder(root, 12, train_per_class=2, test_per_class=1, val_fraction=0.4, seed=0)
    assert np.bincount(capped.train_labels).tolist() == [2, 2, 2] and len(capped.test_labels) == 3
    again = load_class_folder(root, 12, train_per_class=2, test_per_class=1, val_fraction=0.4, seed=0)
    assert (again.train_images == capped.train_images).all()


def test_class_folder_bad_cases(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadProbeFolder, match="has no class folder"):
        load_class_folder(empty, 12, 5, 5, 0.3, 0)
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(BadProbeFolder, match=r"hollow/cat' holds no image file"):
        load_class_folder(tmp_path / "hollow", 12, 5, 5, 0.3, 0)
    write_image(tmp_path / "single" / "cat" / "0.png", 9)
    with pytest.raises(BadProbeFolder, match=r"single/cat' holds one image"):
        load_class_folder(tmp_path / "single", 12, 5, 5, 0.3, 0)
    root = class_folder(tmp_path / "tv", "train_val")
    write_image(root / "val" / "yak" / "0.png", 9)
    with pytest.raises(BadProbeFolder, match=r"val/yak': class not in"):
        load_class_folder(root, 12, 5, 5, 0.3, 0)


def seg_folder(root, n=4, classes=("background", "square")):
    (root / "masks").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for i in range(n):
        write_image(root / "images" / f"im{i}.jpg", 30 * i, size=(24, 20))
        mask = np.zeros((20, 24), np.uint8)
        mask[4:12, 6:16] = 1
        mask[0, :] = 255
        Image.fromarray(mask, "L").save(root / "masks" / f"im{i}.png")
    return root


def test_segmentation_folder(tmp_path):
    root = seg_folder(tmp_path / "voc", n=5)
    write_image(root / "images" / "extra.jpg", 5)  # an image without a mask: left out, said
    split = load_segmentation_folder(root, 12, n_train=10, n_test=10, val_fraction=0.4, seed=0)
    assert split.kind == "segmentation" and split.classes == ["background", "square"]
    assert split.train_images.shape == (3, 12, 12, 3) and split.test_masks.shape == (2, 12, 12)
    expected = np.asarray(Image.fromarray(np.asarray(Image.open(root / "masks" / "im0.png"))).resize((12, 12), Image.NEAREST))
    assert all((m == expected).all() for m in np.concatenate([split.train_masks, split.test_masks]))
    assert "1 image(s) without a mask" in split.note
    probe = ProbeConfig(segmentation_train=2, segmentation_test=1, val_fraction=0.4)
    via_spec = load_probe_set(str(root), probe, 12, seed=0)
    assert via_spec.kind == "segmentation" and len(via_spec.train_images) == 2 and len(via_spec.test_images) == 1


@pytest.mark.parametrize("case,message", [
    ("no_classes_file", r"voc/classes.txt' is missing"),
    ("empty_classes", r"voc/classes.txt' lists no class"),
    ("mask_without_image", r"voc/masks/ghost.png' has no image"),
    ("mask_size", r"voc/masks/im1.png': mask is 10x10, its image 24x20"),
    ("index_outside", r"voc/masks/im2.png': index 7 outside classes.txt"),
    ("rgb_mask", r"voc/masks/im3.png': mode RGB"),
])
def test_segmentation_folder_bad_cases(tmp_path, case, message):
    root = seg_folder(tmp_path / "voc")
    if case == "no_classes_file":
        (root / "classes.txt").unlink()
    elif case == "empty_classes":
        (root / "classes.txt").write_text("\n\n")
    elif case == "mask_without_image":
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "masks" / "ghost.png")
    elif case == "mask_size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "im1.png")
    elif case == "index_outside":
        Image.fromarray(np.full((20, 24), 7, np.uint8)).save(root / "masks" / "im2.png")
    elif case == "rgb_mask":
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "masks" / "im3.png")
    with pytest.raises(BadProbeFolder, match=message) as info:
        load_segmentation_folder(root, 12, n_train=10, n_test=10, val_fraction=0.5, seed=0)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_probe_set_names(tmp_path):
    with pytest.raises(UserError, match=r"probe.data: 'cifar' is neither a built-in set"):
        load_probe_set("cifar", ProbeConfig(), 32, 0)
    split = load_probe_set("digits", ProbeConfig(train_per_class=3, test_per_class=2), 32, 0)
    assert split.kind == "classification" and len(split.train_labels) == 30 and len(split.test_labels) == 20
    root = class_folder(tmp_path / "pets", "flat")
    assert load_probe_set(str(root), ProbeConfig(), 16, 0).classes == ["cat", "dog", "emu"]


def test_a_fallback_set_keeps_a_name_of_its_own(tmp_path, monkeypatch):
    """Without Fashion-MNIST, ``fashion_mnist`` falls back to digits at other sizes: asked for
    beside ``digits``, the two must not share a name (rows and the feature cache key on it)."""
    from lowres_kd.data import labelled

    monkeypatch.setattr(labelled, "FASHION_MNIST_DIR", tmp_path / "missing")
    probe = ProbeConfig(train_per_class=3, test_per_class=2)
    with pytest.warns(UserWarning, match="Fashion-MNIST files not found"):
        stand_in = load_probe_set("fashion_mnist", probe, 32, 0)
    digits = load_probe_set("digits", probe, 32, 0)
    assert (stand_in.name, digits.name) == ("digits (for fashion_mnist)", "digits")
    assert "using the 'digits' set instead" in stand_in.note
