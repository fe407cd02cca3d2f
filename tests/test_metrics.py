"""Metrics from option scores."""

import numpy as np
import pytest

from fedmllm.evaluation.metrics import classification_metrics, probabilities


def test_metrics_from_scores_match_hand_values():
    scores = np.log(np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]]))
    labels = np.array([0, 1, 0, 1])
    m = classification_metrics(scores, labels)
    assert m["accuracy"] == 0.5
    # positive-class probabilities 0.1, 0.6, 0.7, 0.4 -> pairs (pos > neg): (0.6>0.1), (0.4>0.1) = 2 of 4
    assert m["auroc"] == pytest.approx(0.5)
    np.testing.assert_allclose(probabilities(scores).sum(axis=1), 1.0)


def test_auroc_absent_when_one_class_only():
    m = classification_metrics(np.zeros((3, 2)), np.array([1, 1, 1]), prefix="x_")
    assert "x_auroc" not in m and m["x_accuracy"] == 0.0
