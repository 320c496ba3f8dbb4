"""Heads (shapes, resize, rebuild from a state dict) and the loss against a hand computation."""
import math

import pytest
import torch

from lowres_kd.heads import Head, TeacherHeads, bilinear_taps, dense_rows, resized_sq_norm, rows_to_map
from lowres_kd.losses import DISTANCES, fused_linear_distill_reference


def test_head_shapes_and_resize():
    heads = TeacherHeads(student_dims=(40, 24), teacher_dims=(30, 6), grid=(7, 5), hidden=16)
    g, d = heads(torch.randn(3, 40), torch.randn(3, 24, 11, 13))
    assert g.shape == (3, 30) and d.shape == (3, 6, 7, 5)


def test_dense_rows_round_trip_and_bilinear_resize():
    x = torch.randn(2, 4, 3, 5)
    assert torch.equal(rows_to_map(dense_rows(x, (3, 5)), 2, (3, 5)), x)
    constant = torch.ones(1, 4, 3, 3) * torch.arange(4.0).view(1, 4, 1, 1)
    rows = dense_rows(constant, (6, 6))  # a constant map stays constant under bilinear resize
    assert rows.shape == (36, 4) and torch.allclose(rows, torch.arange(4.0).expand(36, 4))


def random_head(in_dim, hidden, out_dim, dtype):
    head = Head(in_dim, hidden, out_dim).to(dtype)
    with torch.no_grad():  # LayerNorm's default gamma 1, beta 0 would hide a misplaced affine
        for p in head.parameters():
            p.normal_()
    return head


@pytest.mark.parametrize("size, grid", [((5, 7), (9, 13)), ((3, 3), (8, 5)), ((4, 4), (4, 9)), ((1, 6), (3, 11)),
                                        ((20, 20), (32, 32))])
def test_upsampled_trunk_equals_resizing_first(size, grid):
    """The trunk run at the student's resolution is the same function, value and gradients, as
    LayerNorm and linear on the resized rows (float64; ragged sizes, one axis kept)."""
    head = random_head(24, 8, 3, torch.float64)
    x = (torch.randn(2, 24, *size, dtype=torch.float64) * 3 + 5).requires_grad_(True)  # off-centre rows
    params = [x, *head.trunk.parameters()]
    ref = head.trunk(dense_rows(x, grid))
    got = head.hidden(x, grid)
    grad = torch.randn_like(ref)
    assert got.shape == ref.shape and torch.allclose(got, ref, rtol=0, atol=1e-10)
    for want, have in zip(torch.autograd.grad(ref, params, grad), torch.autograd.grad(got, params, grad)):
        assert torch.allclose(have, want, rtol=1e-9, atol=1e-9)


def test_upsampled_trunk_in_float32_and_channels_last():
    head = random_head(1408, 64, 6, torch.float32)
    x = torch.randn(3, 1408, 11, 10).contiguous(memory_format=torch.channels_last)
    ref = head.double().trunk(dense_rows(x.double(), (17, 21)))
    got = head.float().hidden(x, (17, 21))
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_resized_sq_norm_matches_the_resized_map():
    z = torch.randn(2, 7, 4, 6, dtype=torch.float64)
    want = dense_rows(z, (9, 8)).pow(2).sum(1).reshape(2, 9, 8)
    assert torch.allclose(resized_sq_norm(z, (9, 8)), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_in, n_out", [(1, 4), (3, 8), (20, 32), (7, 7), (9, 4)])
def test_bilinear_taps_rebuild_the_resize(n_in, n_out):
    first, w0, w1 = bilinear_taps(n_in, n_out)
    x = torch.randn(n_in, dtype=torch.float64)
    resized = torch.nn.functional.interpolate(x.view(1, 1, n_in, 1), size=(n_out, 1), mode="bilinear",
                                              align_corners=False).flatten()
    clamped = first + 1 == n_in
    assert (w1[clamped] == 0).all()  # the second tap past the edge weighs nothing
    second = (first + 1).clamp(max=n_in - 1)
    assert torch.allclose(w0 * x[first] + w1 * x[second], resized, rtol=1e-12, atol=1e-12)
    assert torch.allclose(w0 + w1, torch.ones(n_out, dtype=torch.float64))


def test_head_rebuilds_from_state_dict():
    head = Head(12, 8, 5)
    sizes = Head.sizes_from_state_dict(head.state_dict())
    clone = Head(*sizes)
    clone.load_state_dict(head.state_dict())
    x = torch.randn(4, 12)
    assert sizes == (12, 8, 5) and torch.equal(clone(x), head(x))


def test_loss_matches_a_hand_computation():
    pred = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([[4.0, 3.0], [0.0, 2.5]], dtype=torch.float64)
    alpha, beta = 0.3, 1.0
    # row 0: cos = 24/25; |diff| = (1, 1): smoothL1 = 1 - 0.5 = 0.5 each
    # row 1: cos = 0; |diff| = (1, 2.5): 0.5 and 2.0
    row0 = alpha * (1 - 24 / 25) + (1 - alpha) * 0.5
    row1 = alpha * 1.0 + (1 - alpha) * (0.5 + 2.0) / 2
    got = DISTANCES.get("cos_smoothl1")(pred, target, alpha=alpha, beta=beta)
    assert torch.allclose(got, torch.tensor([row0, row1], dtype=torch.float64))
    # beta = 2: |d| = 1 < 2 -> 0.5 * 1 / 2 = 0.25
    assert math.isclose(float(DISTANCES.get("cos_smoothl1")(pred[:1], target[:1], alpha=0.0, beta=2.0)), 0.25)
    assert torch.allclose(DISTANCES.get("mse")(pred, target), torch.tensor([1.0, (1 + 6.25) / 2], dtype=torch.float64))
    # through the head's last linear: identity weight, zero bias, row weights (mean by weight)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    loss = fused_linear_distill_reference(pred, torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                                          target, w, alpha=alpha, beta=beta)
    assert math.isclose(float(loss), (row0 + 3 * row1) / 4)


def test_zero_rows_do_not_give_nan():
    z = torch.zeros(3, 4)
    assert torch.isfinite(DISTANCES.get("cos_smoothl1")(z, z)).all()


@pytest.mark.parametrize("name", DISTANCES.list())
def test_every_distance_is_zero_at_the_target(name):
    x = torch.randn(5, 7, dtype=torch.float64)
    assert torch.allclose(DISTANCES.get(name)(x, x.clone()), torch.zeros(5, dtype=torch.float64), atol=1e-12)
