"""Evaluation of an adapter on held-out samples: the server's centralized evaluation of the
global adapter (fedmllm.server.evaluate) and each client's of its own model on its own held-out
split (fedmllm.client.rounds, eval.client_fraction)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from fedmllm.config import typed
from fedmllm.data import DatasetSettings
from fedmllm.data.collate import Collator
from fedmllm.data.schema import Sample, modality
from fedmllm.evaluation import MODES, PROTOCOLS, EvalSettings
from fedmllm.evaluation.generation import generate_answers, parse_predictions
from fedmllm.evaluation.metrics import (
    choice_metrics,
    classification_metrics,
    fedmllm_metrics,
    group_metrics,
    open_metrics,
    open_predictions,
)
from fedmllm.evaluation.parsing import fedmllm_parse, option_letters
from fedmllm.evaluation.scoring import score_options
from fedmllm.models.adapter import load_adapter_state


def eval_options(ev: EvalSettings | dict[str, Any], dataset: DatasetSettings | dict[str, Any]) -> dict[str, Any]:
    """evaluate()'s settings from a run's `eval` section (and the dataset's FedMLLM letter range)."""
    ev = typed(EvalSettings, ev, "eval")
    out = {"mode": ev.mode, "max_new_tokens": ev.max_new_tokens, "protocol": ev.protocol}
    if ev.protocol == "fedmllm":
        letters = typed(DatasetSettings, dataset, "dataset").fedmllm_letters
        out["fedmllm"] = {**asdict(ev.fedmllm), "letters": letters}
    return out


def evaluate(
    model,
    collator: Collator,
    samples: list[Sample],
    arrays: dict[str, np.ndarray] | None,
    batch_size: int = 32,
    progress=None,
    mode: str = "score",
    max_new_tokens: int = 8,
    protocol: str = "ours",
    fedmllm: dict[str, Any] | None = None,
    blind: bool = True,
) -> dict[str, Any]:
    """Load `arrays` (if given) and evaluate the held-out samples twice: as they are, and with the
    image removed (unless `blind` is False), so a reader sees how much of the accuracy comes from
    the image.

    mode `score`: option log-likelihoods -> accuracy, macro-F1, AUROC from probabilities.
    mode `generate`: greedy answers of up to `max_new_tokens` tokens, parsed to an option
    (FedMLLM's protocol) -> accuracy, macro-F1, AUROC on hard predictions, `unparsed` count;
    for an open-ended task (dataset.answers=open) matched to the true answer instead ->
    accuracy (VQA-normalized), exact_match, accuracy_closed / accuracy_open (open_metrics).
    protocol `fedmllm` (with mode generate): FedMLLM's evaluation scripts -- answers sampled with
    `fedmllm` (temperature, top_p, top_k, repetition_penalty, seed), read by their regex over the
    letter range `fedmllm["letters"]` with index 2 for anything else, AUROC and macro-F1 on those
    hard predictions (fedmllm.evaluation.parsing.fedmllm_parse, metrics.fedmllm_metrics).
    All add `accuracy_<group>` / `macro_f1_<group>` per modality group (both/image/text/none).
    `_predictions` holds the arrays to save (popped by the caller).
    """
    if mode not in MODES:
        raise ValueError(f"eval.mode={mode!r}: choose one of {', '.join(MODES)}")
    if protocol not in PROTOCOLS or (protocol == "fedmllm" and mode != "generate"):
        raise ValueError(
            f"eval.protocol={protocol!r} with eval.mode={mode!r}: choose eval.protocol=ours, or "
            "eval.protocol=fedmllm with eval.mode=generate (FedMLLM reads generated answers)"
        )
    if collator.task.open and mode != "generate":
        raise ValueError(
            "open-ended answers (dataset.answers=open) are evaluated by generation: set eval.mode=generate"
        )
    if arrays is not None:
        load_adapter_state(model, arrays)
    labels = np.asarray([s["label"] for s in samples])
    tick = progress.update if progress is not None else None

    def run(drop_image: bool, prefix: str) -> tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]:
        if mode == "score":
            scores = score_options(model, collator, samples, batch_size, drop_image=drop_image, on_batch=tick)
            return classification_metrics(scores, labels, prefix), scores.argmax(axis=1), {"scores": scores}
        n = len(collator.task.labels)
        if collator.task.open:  # free-text answers: matched after VQA normalization, not parsed to options
            answers = generate_answers(model, collator, samples, max_new_tokens, batch_size, drop_image, tick)
            vocabulary = collator.task.labels
            metrics = open_metrics(answers, [vocabulary[i] for i in labels.tolist()], prefix)
            pred = open_predictions(answers, vocabulary, labels)
            return metrics, pred, {"answers": np.asarray(answers), "pred": pred}
        if protocol == "fedmllm":
            answers = generate_answers(
                model, collator, samples, max_new_tokens, batch_size, drop_image, tick, sampling=fedmllm
            )
            letters = option_letters(collator.task.answers) or [chr(65 + i) for i in range(n)]
            span = fedmllm.get("letters") or f"A-{letters[-1]}"
            pred = np.asarray([fedmllm_parse(a, letters, span) for a in answers], dtype=np.int64)
            return fedmllm_metrics(pred, labels, n, prefix), pred, {"answers": np.asarray(answers), "pred": pred}
        answers = generate_answers(model, collator, samples, max_new_tokens, batch_size, drop_image, tick)
        pred = parse_predictions(answers, collator.task.answers)  # "(A) not-hateful": parsed by letter
        metrics = choice_metrics(pred, labels, n, prefix)
        return metrics, pred, {"answers": np.asarray(answers), "pred": pred}

    metrics, pred, saved = run(drop_image=False, prefix="")
    metrics.update(group_metrics(pred, labels, [modality(s) for s in samples]))
    if blind and any(s["image"] is not None for s in samples):
        without, _, _ = run(drop_image=True, prefix="no_image_")
        metrics.update(without)
        metrics["accuracy_no_image"] = metrics.pop("no_image_accuracy")
    metrics["eval_samples"] = len(samples)
    metrics["_predictions"] = saved
    return metrics
