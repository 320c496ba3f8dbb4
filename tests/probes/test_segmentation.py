"""segmentation probe: mIoU / pixel accuracy against a numpy loop on hand-made masks; the fitted
1x1 classifier on known answers (separable features: 1.0; constant features: the majority class)."""
import numpy as np
import pytest
import torch

from lowres_kd.probes.segmentation import confusion, fit_score, scores


def numpy_miou(pred, target, num_classes, ignore=255):
    ious = []
    valid = target != ignore
    for c in range(num_classes):
        p, t = (pred == c) & valid, (target == c) & valid
        union = (p | t).sum()
        if union:
            ious.append((p & t).sum() / union)
    return float(np.mean(ious)), float((pred == target)[valid].mean())


def test_scores_match_a_numpy_loop_on_hand_made_masks():
    target = np.array([[0, 0, 1, 1],
                       [0, 2, 1, 255],
                       [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 3],
                     [2, 0, 1, 0]])
    # by hand: class 0 IoU 2/5, class 1 2/4, class 2 2/3, class 3 predicted on an ignored pixel only
    # (absent); 6 of the 9 valid pixels right
    miou, acc = scores(confusion(pred, target, 4))
    assert miou == pytest.approx((2 / 5 + 2 / 4 + 2 / 3) / 3)
    assert acc == pytest.approx(6 / 9)
    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, (3, 17, 13)).astype(np.uint8)
    t[rng.random(t.shape) < 0.1] = 255
    p = rng.integers(0, 5, t.shape)
    assert scores(confusion(p, t, 6)) == pytest.approx(numpy_miou(p, t, 6))


def test_separable_features_score_one():
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(rng.integers(0, 3, (6, 8, 8)))
    x = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float() + 0.01 * torch.randn(6, 3, 8, 8)
    masks = masks.to(torch.uint8)
    masks[0, 0, :4] = 255  # ignored pixels neither train nor count
    assert fit_score(x[:3], masks[:3], x[3:], masks[3:], 3, steps=50) == (1.0, 1.0)


def test_constant_features_score_the_majority_class():
    rng = np.random.default_rng(2)
    masks = torch.from_numpy((rng.random((8, 16, 16)) < 0.3).astype(np.uint8) * rng.integers(1, 3, (8, 16, 16)))
    x = torch.ones(8, 4, 4, 4)
    miou, acc = fit_score(x[:4], masks[:4], x[4:], masks[4:], 3, steps=100)
    share = float((masks[4:] == 0).float().mean())  # everything predicted background
    assert acc == pytest.approx(share) and miou == pytest.approx(share / 3)
