"""Centralized evaluation of a global adapter on the held-out split (with and without images)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmllm.data.collate import Collator
from fedmllm.data.schema import Sample, modality
from fedmllm.evaluation.generation import generate_answers, parse_predictions
from fedmllm.evaluation.metrics import choice_metrics, classification_metrics, group_metrics
from fedmllm.evaluation.scoring import score_options
from fedmllm.models.adapter import load_adapter_state

MODES = ("score", "generate")


def evaluate(model, collator: Collator, samples: list[Sample], arrays: dict[str, np.ndarray] | None,
             batch_size: int = 32, progress=None, mode: str = "score", max_new_tokens: int = 8) -> dict[str, Any]:
    """Load `arrays` (if given) and evaluate the held-out samples twice: as they are, and with the
    image removed, so a reader sees how much of the accuracy comes from the image.

    mode `score`: option log-likelihoods -> accuracy, macro-F1, AUROC from probabilities.
    mode `generate`: greedy answers of up to `max_new_tokens` tokens, parsed to an option
    (FedMLLM's protocol) -> accuracy, macro-F1, AUROC on hard predictions, `unparsed` count.
    Both add `accuracy_<group>` / `macro_f1_<group>` per modality group (both/image/text/none).
    `_predictions` holds the arrays to save (popped by the caller).
    """
    if mode not in MODES:
        raise ValueError(f"eval.mode={mode!r}: choose one of {', '.join(MODES)}")
    if arrays is not None:
        load_adapter_state(model, arrays)
    labels = np.asarray([s["label"] for s in samples])
    tick = progress.update if progress is not None else None

    def run(drop_image: bool, prefix: str) -> tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]:
        if mode == "score":
            scores = score_options(model, collator, samples, batch_size, drop_image=drop_image, on_batch=tick)
            return classification_metrics(scores, labels, prefix), scores.argmax(axis=1), {"scores": scores}
        answers = generate_answers(model, collator, samples, max_new_tokens, batch_size, drop_image, tick)
        pred = parse_predictions(answers, collator.task.answers)  # "(A) not-hateful": parsed by letter
        metrics = choice_metrics(pred, labels, len(collator.task.labels), prefix)
        return metrics, pred, {"answers": np.asarray(answers), "pred": pred}

    metrics, pred, saved = run(drop_image=False, prefix="")
    metrics.update(group_metrics(pred, labels, [modality(s) for s in samples]))
    if any(s["image"] is not None for s in samples):
        blind, _, _ = run(drop_image=True, prefix="no_image_")
        metrics.update(blind)
        metrics["accuracy_no_image"] = metrics.pop("no_image_accuracy")
    metrics["eval_samples"] = len(samples)
    metrics["_predictions"] = saved
    return metrics


def predictions(model, collator: Collator, samples: list[Sample], batch_size: int = 32) -> np.ndarray:
    """Option scores of the held-out samples (for reproducing a checkpoint's predictions)."""
    return score_options(model, collator, samples, batch_size)
