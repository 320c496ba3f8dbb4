"""knn probe: the DINO-style weighted vote against scikit-learn's k-NN, and known answers."""
import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from lowres_kd.probes.knn import knn_predict


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 0.5), (1, 0.07)])
def test_knn_matches_sklearn_cosine_weighted(k, temperature):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 12))
    y_fit, y_eval = rng.integers(0, 4, 300), rng.integers(0, 4, 97)
    x_fit = centres[y_fit] + 1.5 * rng.normal(size=(300, 12))
    x_eval = centres[y_eval] + 1.5 * rng.normal(size=(97, 12))
    # sklearn's cosine distance is 1 - cos: the vote weight exp(cos / T) = exp((1 - d) / T)
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / temperature)).fit(x_fit, y_fit)
    ours = knn_predict(torch.from_numpy(x_fit), torch.from_numpy(y_fit), torch.from_numpy(x_eval), k, temperature, 4)
    expected = ref.predict(x_eval)
    assert (ours.numpy() == expected).all()
    assert 0.4 < (expected == y_eval).mean() < 1.0  # a case where the vote matters


def test_knn_known_answers():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(5), 20)
    separable = torch.from_numpy(np.eye(5)[y] + 0.01 * rng.normal(size=(100, 5)))
    pred = knn_predict(separable, torch.from_numpy(y), separable, 20, 0.07, 5)
    assert (pred.numpy() == y).mean() == 1.0
    constant = torch.ones(100, 3, dtype=torch.float64)  # every neighbour equally close: the vote is the class shares
    pred = knn_predict(constant, torch.from_numpy(y), constant, 100, 0.07, 5)
    assert (pred.numpy() == y).mean() == pytest.approx(1 / 5)


def test_knn_small_temperature_and_k_above_the_fitted_count():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]], dtype=torch.float64)
    pred = knn_predict(x[:2], torch.tensor([0, 1]), x[2:], k=20, temperature=1e-4, num_classes=2)
    assert pred.tolist() == [0]  # exp(cos / T) would overflow to inf without the per-row shift
