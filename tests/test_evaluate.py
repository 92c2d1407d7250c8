"""Metrics against independent references: scikit-learn and a plain PyTorch computation."""

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support
from torch.nn import functional as F

from fashionnet import CLASSES, FashionNet
from fashionnet.data import to_input
from fashionnet.evaluate import evaluate, per_class_report


def test_per_class_report_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    predictions = np.where(rng.random(2000) < 0.8, labels, rng.integers(0, 10, 2000))
    report = per_class_report(labels, predictions)
    assert list(report.columns) == ["class", "precision", "recall", "f1-score", "support"]
    assert list(report["class"]) == [*CLASSES, "macro avg", "weighted avg"]
    p, r, f, s = precision_recall_fscore_support(labels, predictions, labels=range(10))
    rows = report.iloc[:10]
    np.testing.assert_allclose(rows["precision"], p)
    np.testing.assert_allclose(rows["recall"], r)
    np.testing.assert_allclose(rows["f1-score"], f)
    assert rows["support"].tolist() == s.tolist()
    macro = precision_recall_fscore_support(labels, predictions, average="macro")
    np.testing.assert_allclose(
        report.iloc[10][["precision", "recall", "f1-score"]].to_numpy(float), macro[:3])


def test_evaluate_matches_a_plain_forward_pass(official):
    torch.manual_seed(0)
    model = FashionNet()
    model.train()  # evaluate must switch to eval mode itself, then restore
    data = official[1].subset(np.arange(700))
    result = evaluate(model, data, batch_size=256)  # several batches, a partial last one
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(to_input(data.images))
    assert result.loss == pytest.approx(F.cross_entropy(logits, data.labels).item(), rel=1e-5)
    assert np.array_equal(result.predictions, logits.argmax(1).numpy())
    assert result.accuracy == pytest.approx((logits.argmax(1) == data.labels).float().mean())
