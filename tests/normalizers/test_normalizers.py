"""Normalisers: a registry sweep (layouts, inversion, checkpoints, errors) plus PHI-S and Hadamard maths."""
import math

import pytest
import torch

from lowres_kd.normalizers import NORMALIZERS, Normalizer, build_normalizer, hadamard, hadamard_construction
from lowres_kd.normalizers.phi_s import constant_diagonal_rotation

ALL = NORMALIZERS.list()


def _features(n, c, dtype=torch.float64, spread=(-1.0, 1.0)):
    """Correlated rows with a non-zero mean and eigenvalues 10**spread[0] .. 10**spread[1]."""
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    std = torch.logspace(spread[0] / 2, spread[1] / 2, c, dtype=torch.float64)
    mean = 5.0 * torch.randn(c, dtype=torch.float64)
    return ((torch.randn(n, c, dtype=torch.float64) * std) @ q.T + mean).to(dtype)


def _fitted(name, c, x):
    norm = build_normalizer(name, c)
    norm.update(x)
    return norm.fit()


def _maps(rows, n):
    """(n·h·w, C) rows -> (n, C, h, w) maps holding the same samples."""
    c = rows.shape[1]
    hw = rows.shape[0] // n
    h = int(math.isqrt(hw))
    return rows[: n * h * (hw // h)].reshape(n, h, hw // h, c).permute(0, 3, 1, 2)


# ------------------------------------------------------------------ registry sweep


def test_registry_has_the_design_normalizers():
    assert {"standardize", "phi-s"} <= set(ALL)
    with pytest.raises(KeyError, match="phi-s"):
        build_normalizer("phi_s", 4)


@pytest.mark.parametrize("name", ALL)
def test_unfitted_is_identity(name):
    norm = build_normalizer(name, 5)
    assert not norm.is_fitted
    for x in (torch.randn(7, 5), torch.randn(2, 5, 3, 4), torch.randn(3, 5, dtype=torch.float64)):
        torch.testing.assert_close(norm(x), x, rtol=0, atol=0)
        torch.testing.assert_close(norm.inverse(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("c", [5, 12])
def test_rows_and_maps_agree(name, c):
    rows = _features(2 * 6 * 5, c)
    maps = _maps(rows, 2)
    a, b = _fitted(name, c, rows), _fitted(name, c, maps)
    assert a.num_samples == b.num_samples == rows.shape[0]
    for key in ("mean", "tx", "inv_tx"):
        torch.testing.assert_close(a.state_dict()[key], b.state_dict()[key], rtol=1e-6, atol=1e-6)
    for dtype in (torch.float32, torch.float64):
        y = b(maps.to(dtype))
        assert y.shape == maps.shape and y.dtype == dtype
        torch.testing.assert_close(y.permute(0, 2, 3, 1).reshape(-1, c), a(rows.to(dtype)))


@pytest.mark.parametrize("name", ALL)
def test_streaming_equals_one_batch(name):
    x = _features(300, 9)
    one = _fitted(name, 9, x)
    many = build_normalizer(name, 9)
    for chunk in x.split([1, 50, 99, 150]):
        many.update(chunk)
    many.fit()
    torch.testing.assert_close(many._stat_m2, one._stat_m2, rtol=1e-12, atol=1e-9)
    for key in ("mean", "tx", "inv_tx"):
        torch.testing.assert_close(many.state_dict()[key], one.state_dict()[key])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("c", [1, 7, 16])
def test_exact_inversion(name, c):
    x = _features(400, c, spread=(-2.0, 2.0))
    norm = _fitted(name, c, x)
    # float64: the solve against tx inverts the stored map to float64 precision
    y = norm(x)
    torch.testing.assert_close(norm.inverse(y), x, rtol=1e-10, atol=1e-10)
    maps = _maps(x, 4)
    torch.testing.assert_close(norm.inverse(norm(maps)), maps, rtol=1e-10, atol=1e-10)
    # float32 / bfloat16: to the dtype's tolerance (this data's tx has condition number 100)
    x32 = x.float()
    torch.testing.assert_close(norm.inverse(norm(x32)), x32, rtol=1e-4, atol=1e-4)
    xb = x.to(torch.bfloat16)
    out = norm.inverse(norm(xb))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), xb.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name):
    c = 12
    x = _features(200, c)
    norm = _fitted(name, c, x)
    sd = norm.state_dict()
    assert {"mean", "tx", "inv_tx", "fitted"} <= set(sd)
    assert not any("stat" in k for k in sd), "calibration statistics must not be checkpointed"
    assert sd["tx"].dtype == sd["inv_tx"].dtype == sd["mean"].dtype == torch.float32
    for fresh in (build_normalizer(name, c), Normalizer.from_state_dict(name, sd)):
        if not fresh.is_fitted:
            fresh.load_state_dict(sd)
        assert fresh.is_fitted and fresh.num_samples == 0
        assert type(fresh) is type(norm) and fresh.construction == norm.construction
        torch.testing.assert_close(fresh(x), norm(x), rtol=0, atol=0)
        torch.testing.assert_close(fresh.inverse(x.float()), norm.inverse(x.float()), rtol=0, atol=0)
    # a torch.save checkpoint loads with weights_only=True
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    again = Normalizer.from_state_dict(name, torch.load(buf, weights_only=True))
    torch.testing.assert_close(again(x), norm(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_shape_errors_name_the_shape(name):
    norm = build_normalizer(name, 5)
    bad = [torch.zeros(2, 5, 3), torch.zeros(5), torch.zeros(2, 4), torch.zeros(2, 6, 3, 3), torch.zeros(1, 1, 5, 2, 2)]
    for x in bad:
        for fn in (norm, norm.inverse, norm.update):
            with pytest.raises(ValueError) as err:
                fn(x)
            msg = str(err.value)
            assert str(tuple(x.shape)) in msg and "(N, 5)" in msg and "(N, 5, H, W)" in msg
    with pytest.raises(TypeError):
        norm(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="at least 2 samples"):
        norm.fit()
    norm.update(torch.zeros(1, 5))
    with pytest.raises(RuntimeError, match="at least 2 samples"):
        norm.fit()


@pytest.mark.parametrize("name", ALL)
def test_buffers_keep_float32_and_gradients_flow(name):
    norm = _fitted(name, 6, _features(100, 6))
    norm.to(torch.bfloat16)
    assert norm.tx.dtype == norm.inv_tx.dtype == norm.mean.dtype == torch.float32
    assert norm._stat_m2.dtype == torch.float64
    norm.double()
    assert norm.tx.dtype == torch.float32
    x = torch.randn(3, 6, 2, 2, requires_grad=True)
    norm(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    norm.reset_stats()
    assert norm.num_samples == 0 and norm.is_fitted


@pytest.mark.parametrize("name", ALL)
def test_rank_note_only_for_eigenbasis_transforms_on_too_few_samples(name):
    few, enough = _fitted(name, 12, _features(12, 12)), _fitted(name, 12, _features(13, 12))
    assert enough.rank_note() is None
    if NORMALIZERS.get(name).uses_eigenbasis:
        assert "12 samples for 12 channels" in few.rank_note() and "more than 12 samples" in few.rank_note()
    else:
        assert few.rank_note() is None


def test_phi_s_null_space_is_arbitrary_only_below_full_rank():
    """Why the note exists: the same samples summed in another order give another transform when
    rank-deficient, the same one (to rounding) at full rank."""
    for n, same in ((8, False), (200, True)):
        x = _features(n, 12)
        one, other = build_normalizer("phi-s", 12), build_normalizer("phi-s", 12)
        one.update(x)
        for chunk in x.flip(0).split(3):
            other.update(chunk)
        close = torch.allclose(one.fit().tx, other.fit().tx, atol=1e-4)
        assert close == same, n


# ------------------------------------------------------------------ per kind


def test_standardize_gives_zero_mean_unit_std():
    x = _features(500, 10, spread=(-3.0, 3.0))
    norm = _fitted("standardize", 10, x)
    y = norm(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(10, dtype=x.dtype), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.std(0), torch.ones(10, dtype=x.dtype), rtol=1e-6, atol=0)
    assert norm.tx.diagonal().gt(0).all() and torch.count_nonzero(norm.tx - torch.diag(norm.tx.diagonal())) == 0


def test_standardize_dead_channel_stays_finite():
    x = _features(50, 4)
    x[:, 2] = 3.0
    norm = _fitted("standardize", 4, x)
    y = norm(x)
    assert torch.isfinite(y).all() and y[:, 2].abs().max() < 1e-4


def test_identity_changes_nothing_after_fit():
    x = _features(50, 4)
    norm = _fitted("identity", 4, x)
    assert norm.is_fitted
    torch.testing.assert_close(norm(x), x, rtol=0, atol=0)


PHI_S_WIDTHS = [4, 12, 20, 64, 768, 1280, 6, 7, 1312]


@pytest.mark.parametrize("c", PHI_S_WIDTHS)
def test_phi_s_equalises_the_diagonal_without_whitening(c):
    # Eigenvalues 1e-4 .. 1e4, random rotation, non-zero mean; float64 statistics.
    x = _features(c + 64, c, spread=(-4.0, 4.0))
    norm = _fitted("phi-s", c, x)
    y = norm(x)
    cov = torch.cov(y.T)
    diag = cov.diagonal()
    torch.testing.assert_close(diag, torch.ones_like(diag), rtol=1e-6, atol=0)
    off = cov - torch.diag(diag)
    assert off.abs().max() > 0.1, "phi-s must not whiten"
    torch.testing.assert_close(y.mean(0), torch.zeros(c, dtype=y.dtype), rtol=0, atol=1e-4)
    # tx is one scalar times an orthogonal matrix
    tx = norm.tx.double()
    gram = tx @ tx.T
    torch.testing.assert_close(gram / gram[0, 0], torch.eye(c, dtype=gram.dtype), rtol=0, atol=1e-5)
    expected = "hadamard" if hadamard_construction(c) else "givens"
    assert norm.construction.startswith(expected)
    assert int(norm.construction_id) == (1 if expected == "hadamard" else 2)


def test_phi_s_construction_survives_checkpoint():
    x = _features(40, 6)
    sd = _fitted("phi-s", 6, x).state_dict()
    assert Normalizer.from_state_dict("phi-s", sd).construction == "givens: no Hadamard matrix of order 6"
    assert _fitted("phi-s", 12, _features(40, 12)).construction == "hadamard: paley1(q=11)"


@pytest.mark.parametrize("c", [2, 3, 5, 6, 9])
def test_constant_diagonal_rotation(c):
    lam = torch.logspace(-4, 4, c, dtype=torch.float64)[torch.randperm(c)]
    r = constant_diagonal_rotation(lam)
    torch.testing.assert_close(r @ r.T, torch.eye(c, dtype=r.dtype), rtol=0, atol=1e-12)
    d = (r * lam) @ r.T
    torch.testing.assert_close(d.diagonal(), lam.mean().expand(c), rtol=1e-12, atol=0)
    # equal eigenvalues: nothing to do
    torch.testing.assert_close(constant_diagonal_rotation(torch.full((c,), 2.0)), torch.eye(c, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 768, 1280, 1312])
def test_hadamard_is_orthogonal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n) and h.dtype == torch.float64
    torch.testing.assert_close(h.abs(), torch.full_like(h, n**-0.5), rtol=0, atol=1e-15)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=h.dtype), rtol=0, atol=1e-12)
    assert isinstance(hadamard_construction(n), str)


@pytest.mark.parametrize("n", [6, 7, 10, 3, 0])
def test_hadamard_none_where_impossible(n):
    assert hadamard(n) is None and hadamard_construction(n) is None


def test_hadamard_plans():
    assert hadamard_construction(768) == "sylvester(64) ⊗ paley1(q=11)"
    assert hadamard_construction(1280) == "sylvester(64) ⊗ paley1(q=19)"
    assert hadamard_construction(1312) == "sylvester(8) ⊗ paley1(q=163)"
    assert hadamard_construction(28) == "paley2(q=13)"
    assert hadamard(12, dtype=torch.float32).dtype == torch.float32
