"""Classification metrics from option scores: accuracy, macro-F1, AUROC from probabilities."""

from __future__ import annotations

import numpy as np


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Softmax over options of their log-likelihoods."""
    z = scores - scores.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def classification_metrics(scores: np.ndarray, labels: np.ndarray, prefix: str = "") -> dict[str, float]:
    """accuracy, macro_f1 and (binary, both classes present) auroc from option scores."""
    from sklearn.metrics import f1_score, roc_auc_score

    labels = np.asarray(labels)
    pred = scores.argmax(axis=1)
    out = {
        f"{prefix}accuracy": float((pred == labels).mean()),
        f"{prefix}macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
    }
    if scores.shape[1] == 2 and len(set(labels.tolist())) == 2:
        out[f"{prefix}auroc"] = float(roc_auc_score(labels, probabilities(scores)[:, 1]))
    return out
