"""Linear classification on frozen global features: logistic regression, on every classification
set of ``probe.data`` (fitted on its train images, scored on its separate test images)."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from .base import PROBES, ProbeContext, row


def linear_accuracy(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray) -> float:
    """Top-1 accuracy of an L2-regularised logistic regression on standardised features."""
    scaler = StandardScaler().fit(x_fit)
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(x_fit), y_fit)
    return float(np.mean(clf.predict(scaler.transform(x_eval)) == y_eval))


@PROBES.register("linear")
def linear_probe(ctx: ProbeContext):
    rows = []
    for split in ctx.probe_sets("classification"):
        for name in ctx.subjects:
            xtr = ctx.features(name, f"{split.name}/train", split.train_images, dense=False).global_.numpy()
            xte = ctx.features(name, f"{split.name}/test", split.test_images, dense=False).global_.numpy()
            acc = linear_accuracy(xtr, split.train_labels, xte, split.test_labels)
            rows.append(row("linear", name, "accuracy", acc, dataset=split.name, n_train=len(xtr), n_test=len(xte)))
    return rows
