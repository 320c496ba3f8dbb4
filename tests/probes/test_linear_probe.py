"""linear probe: scikit-learn's logistic regression by another route, and known answers."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from lowres_kd.probes.linear import linear_accuracy


def test_linear_matches_an_independent_fit():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3))
    x = rng.normal(size=(400, 8)) * rng.uniform(0.1, 10, size=8)  # scales the probe standardises
    y = (x / x[:300].std(0) @ w + 0.8 * rng.normal(size=(400, 3))).argmax(1)
    mu, sd = x[:300].mean(0), x[:300].std(0)
    ref = LogisticRegression(max_iter=5000, C=0.1).fit((x[:300] - mu) / sd, y[:300])
    expected = (ref.predict((x[300:] - mu) / sd) == y[300:]).mean()
    assert linear_accuracy(x[:300], y[:300], x[300:], y[300:]) == pytest.approx(expected, abs=0.011)
    assert 0.5 < expected < 1.0


def test_linear_known_answers():
    y = np.repeat(np.arange(4), 10)
    separable = np.eye(4)[y] * 5.0
    assert linear_accuracy(separable, y, separable, y) == 1.0
    constant = np.ones((40, 6))
    assert linear_accuracy(constant, y, constant, y) == pytest.approx(1 / 4)  # balanced classes: chance
