"""The built-in segmentation set: items pasted onto the embedded photos, masks exact, seeded."""
import numpy as np

from lowres_kd.data import make_pasted_set


def test_pasted_set_masks_and_seed():
    split = make_pasted_set(6, 4, 48, seed=3)
    assert split.train_images.shape == (6, 48, 48, 3) and split.test_masks.shape == (4, 48, 48)
    assert split.classes[0] == "background" and len(split.classes) == 11 and split.kind == "segmentation"
    for images, masks in ((split.train_images, split.train_masks), (split.test_images, split.test_masks)):
        assert masks.max() <= 10
        on = masks > 0
        assert 0.02 < on.mean() < 0.6  # items cover part of each picture
        grey = images[..., 0]
        # an item's pixels are painted grey and brighter than the threshold; the photo shows elsewhere
        assert (images[on][:, 0] == images[on][:, 1]).all() and (images[on][:, 1] == images[on][:, 2]).all()
        assert (grey[on] > 40).all()
        assert all(len(np.unique(m)) >= 2 for m in masks)
    again = make_pasted_set(6, 4, 48, seed=3)
    assert (again.train_images == split.train_images).all() and (again.test_masks == split.test_masks).all()
    other = make_pasted_set(6, 4, 48, seed=4)
    assert not (other.train_masks == split.train_masks).all()
