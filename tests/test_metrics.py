"""Metrics from option scores."""

import numpy as np
import pytest

from fedmllm.evaluation.metrics import UNPARSED, choice_metrics, classification_metrics, group_metrics, probabilities


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


def test_hard_prediction_metrics_count_unparsed_as_wrong():
    labels = np.array([0, 1, 1, 0])
    pred = np.array([0, 1, UNPARSED, UNPARSED])
    m = choice_metrics(pred, labels, n_options=2)
    assert m["accuracy"] == 0.5 and m["unparsed"] == 2
    # unparsed -> the wrong class for AUROC: effective pred [0, 1, 0, 1] -> roc_auc_score = 0.5
    assert m["auroc"] == pytest.approx(0.5)
    # unparsed is a miss, not a third class: F1(0) = 2/3 (tp 1, fn 1, fp 0), F1(1) = 2/3
    assert m["macro_f1"] == pytest.approx(2 / 3)


def test_hard_prediction_auroc_is_fedmllms_roc_on_labels():
    m = choice_metrics(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]), n_options=2)
    assert m["auroc"] == pytest.approx((1.0 + 2 / 3) / 2)  # TPR 1, FPR 1/3 -> trapezoid
    multi = choice_metrics(np.array([0, 2, 1]), np.array([0, 1, 2]), n_options=3)
    assert "auroc" not in multi and multi["accuracy"] == pytest.approx(1 / 3)


def test_group_metrics_break_down_by_modality_in_report_order():
    labels = np.array([1, 0, 1, 1, 0])
    pred = np.array([1, 0, 0, 1, 1])
    m = group_metrics(pred, labels, ["text", "both", "both", "none", "text"])
    assert list(m) == [
        "accuracy_both",
        "macro_f1_both",
        "eval_samples_both",
        "accuracy_text",
        "macro_f1_text",
        "eval_samples_text",
        "accuracy_none",
        "macro_f1_none",
        "eval_samples_none",
    ]
    assert (m["accuracy_both"], m["accuracy_text"], m["accuracy_none"]) == (0.5, 0.5, 1.0)
    assert m["eval_samples_both"] == 2 and m["macro_f1_none"] == 1.0
    with pytest.raises(ValueError, match="one group per sample: 5 predictions, 5 labels, 1 groups"):
        group_metrics(pred, labels, ["both"])
