"""Classification metrics: from option scores (probabilities), from hard predictions, and per modality group."""

from __future__ import annotations

import numpy as np

UNPARSED = -1  # hard prediction of an answer that names no option

# Report order of the modality groups (fedmllm.data.schema.modality).
MODALITY_ORDER = ("both", "image", "text", "none")


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Softmax over options of their log-likelihoods."""
    z = scores - scores.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def classification_metrics(scores: np.ndarray, labels: np.ndarray, prefix: str = "") -> dict[str, float]:
    """accuracy, macro_f1 and (binary, both classes present) auroc from option scores."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    pred = scores.argmax(axis=1)
    out = {f"{prefix}accuracy": float((pred == labels).mean()), f"{prefix}macro_f1": macro_f1(pred, labels)}
    if scores.shape[1] == 2 and len(set(labels.tolist())) == 2:
        out[f"{prefix}auroc"] = float(roc_auc_score(labels, probabilities(scores)[:, 1]))
    return out


def macro_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Macro-F1 over the classes that occur in `labels` or among the parsed predictions.

    An UNPARSED prediction is a miss for its true class, not a class of its own (which would
    add a zero to the average).
    """
    from sklearn.metrics import f1_score

    pred, labels = np.asarray(pred), np.asarray(labels)
    classes = sorted(set(labels.tolist()) | set(pred[pred != UNPARSED].tolist()))
    return float(f1_score(labels, pred, labels=classes, average="macro", zero_division=0))


def choice_metrics(pred: np.ndarray, labels: np.ndarray, n_options: int, prefix: str = "") -> dict[str, float]:
    """accuracy, macro_f1, unparsed count and (binary, both classes present) auroc from hard
    predictions (option indices, UNPARSED for an answer that names no option).

    AUROC on hard predictions is FedMLLM's `roc_auc_score(labels, pred)`; an unparsed answer
    counts as the wrong class there too, as it does for accuracy.
    """
    from sklearn.metrics import roc_auc_score

    pred, labels = np.asarray(pred), np.asarray(labels)
    out = {
        f"{prefix}accuracy": float((pred == labels).mean()),
        f"{prefix}macro_f1": macro_f1(pred, labels),
        f"{prefix}unparsed": int((pred == UNPARSED).sum()),
    }
    if n_options == 2 and len(set(labels.tolist())) == 2:
        wrong = np.where(pred == UNPARSED, 1 - labels, pred)
        out[f"{prefix}auroc"] = float(roc_auc_score(labels, wrong))
    return out


def group_metrics(pred: np.ndarray, labels: np.ndarray, groups: list[str]) -> dict[str, float]:
    """`accuracy_<group>`, `macro_f1_<group>` and `eval_samples_<group>` for every group present
    (groups: each sample's modality group, e.g. both/image/text/none)."""
    pred, labels, groups_arr = np.asarray(pred), np.asarray(labels), np.asarray(groups)
    if not len(pred) == len(labels) == len(groups_arr):
        raise ValueError(
            f"group_metrics needs one group per sample: {len(pred)} predictions, "
            f"{len(labels)} labels, {len(groups_arr)} groups"
        )
    present = set(groups)
    order = [g for g in MODALITY_ORDER if g in present] + sorted(present - set(MODALITY_ORDER))
    out: dict[str, float] = {}
    for g in order:
        m = groups_arr == g
        out[f"accuracy_{g}"] = float((pred[m] == labels[m]).mean())
        out[f"macro_f1_{g}"] = macro_f1(pred[m], labels[m])
        out[f"eval_samples_{g}"] = int(m.sum())
    return out


def fedmllm_metrics(pred: np.ndarray, labels: np.ndarray, n_options: int, prefix: str = "") -> dict[str, float]:
    """FedMLLM's metrics on hard predictions (eval.protocol=fedmllm): `auroc` is their
    `roc_auc_score(truth, pred)` on option indices, the fallback index 2 included as a value (a
    two-option task's unparsed answer ranks above "(B)"); `macro_f1` their `f1_score(truth, pred,
    average='macro')` over the classes in either (the fallback, a class of its own on a
    two-option task, adds a zero there); `accuracy` beside them (their scripts print per-class
    counts only); `unparsed` counts answers that named no option of the task."""
    from sklearn.metrics import f1_score, roc_auc_score

    pred, labels = np.asarray(pred), np.asarray(labels)
    out = {
        f"{prefix}accuracy": float((pred == labels).mean()),
        f"{prefix}macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        f"{prefix}unparsed": int((pred >= n_options).sum()),
    }
    if n_options == 2 and len(set(labels.tolist())) == 2:
        out[f"{prefix}auroc"] = float(roc_auc_score(labels, pred))
    return out
