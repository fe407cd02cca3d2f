"""Centralized evaluation of a global adapter on the held-out split (with and without images)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmllm.data.collate import Collator
from fedmllm.data.schema import Sample
from fedmllm.evaluation.metrics import classification_metrics
from fedmllm.evaluation.scoring import score_options
from fedmllm.models.adapter import load_adapter_state


def evaluate(model, collator: Collator, samples: list[Sample], arrays: dict[str, np.ndarray] | None,
             batch_size: int = 32, progress=None) -> dict[str, Any]:
    """Load `arrays` (if given) and score the held-out samples twice: as they are, and with the
    image removed, so a reader sees how much of the accuracy comes from the image."""
    if arrays is not None:
        load_adapter_state(model, arrays)
    labels = np.asarray([s["label"] for s in samples])
    tick = progress.update if progress is not None else None
    scores = score_options(model, collator, samples, batch_size, on_batch=tick)
    metrics = classification_metrics(scores, labels)
    metrics["_scores"] = scores
    if any(s["image"] is not None for s in samples):
        blind = score_options(model, collator, samples, batch_size, drop_image=True, on_batch=tick)
        metrics.update(classification_metrics(blind, labels, prefix="no_image_"))
        metrics["accuracy_no_image"] = metrics.pop("no_image_accuracy")
    metrics["eval_samples"] = len(samples)
    return metrics


def predictions(model, collator: Collator, samples: list[Sample], batch_size: int = 32) -> np.ndarray:
    """Option scores of the held-out samples (for reproducing a checkpoint's predictions)."""
    return score_options(model, collator, samples, batch_size)
