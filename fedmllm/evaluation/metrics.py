"""Classification metrics: from option scores (probabilities), from hard predictions, and per modality group."""

from __future__ import annotations

import re

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


# --- open-ended answers (dataset.answers=open) ---------------------------------------------------

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"(?<!\d)\.(?!\d)|[^\w\s.]")  # every mark but a decimal point


def vqa_normalize(text: str) -> str:
    """An answer as the VQA evaluation compares it: its first line, lowercased, punctuation
    removed (a decimal point kept), number words as digits, articles dropped, spaces collapsed."""
    first = (text.strip().splitlines() or [""])[0].lower()
    words = _PUNCTUATION.sub(" ", first.replace("'", "")).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def open_predictions(answers: list[str], vocabulary: tuple[str, ...], labels: np.ndarray) -> np.ndarray:
    """Each generated answer as an index into the answer vocabulary: the true answer's index when
    they normalize alike, else the first vocabulary entry that does, else UNPARSED."""
    index: dict[str, int] = {}
    for i, v in enumerate(vocabulary):
        index.setdefault(vqa_normalize(v), i)
    out = []
    for answer, label in zip(answers, np.asarray(labels).tolist()):
        norm = vqa_normalize(answer)
        out.append(label if norm == vqa_normalize(vocabulary[label]) else index.get(norm, UNPARSED))
    return np.asarray(out, dtype=np.int64)


def open_metrics(answers: list[str], truths: list[str], prefix: str = "") -> dict[str, float]:
    """Open-ended answers against the true ones: `accuracy`, VQA-normalized exact match (with
    one reference answer, VQA accuracy is this match); `exact_match`, the trimmed answers equal
    ignoring case; `accuracy_closed` / `accuracy_open` over the questions answered yes/no and the
    others (as medical VQA reports them), each when present."""
    if len(answers) != len(truths):
        raise ValueError(f"open_metrics: {len(answers)} answers for {len(truths)} reference answers")
    norm = np.asarray([vqa_normalize(a) == vqa_normalize(t) for a, t in zip(answers, truths)], dtype=bool)
    exact = [a.strip().lower() == t.strip().lower() for a, t in zip(answers, truths)]
    closed = np.asarray([vqa_normalize(t) in ("yes", "no") for t in truths], dtype=bool)
    out = {f"{prefix}accuracy": float(norm.mean()) if len(norm) else 0.0}
    out[f"{prefix}exact_match"] = float(np.mean(exact)) if exact else 0.0
    if closed.any():
        out[f"{prefix}accuracy_closed"] = float(norm[closed].mean())
    if (~closed).any():
        out[f"{prefix}accuracy_open"] = float(norm[~closed].mean())
    return out
