"""Linear classification on frozen global features (Fashion-MNIST, train/test files apart)."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ..data import load_labelled
from .base import PROBES, ProbeContext, batched, images_to_tensor, row


@PROBES.register("linear")
def linear_probe(ctx: ProbeContext):
    p = ctx.recipe.probe
    split = load_labelled(p.labelled, n_train=p.train_per_class * 10, n_test=p.test_per_class * 10, seed=ctx.recipe.train.seed)
    if split.note:
        ctx.notes.append(f"linear probe: {split.note}")
    train = images_to_tensor(split.train_images, ctx.image_size)
    test = images_to_tensor(split.test_images, ctx.image_size)
    rows = []
    for name, subject in ctx.subjects.items():
        xtr = batched(subject, train, ctx.device).global_.numpy()
        xte = batched(subject, test, ctx.device).global_.numpy()
        scaler = StandardScaler().fit(xtr)
        clf = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(xtr), split.train_labels)
        acc = float(np.mean(clf.predict(scaler.transform(xte)) == split.test_labels))
        rows.append(row("linear", name, "accuracy", acc, dataset=split.name, n_train=len(xtr), n_test=len(xte)))
    return rows
