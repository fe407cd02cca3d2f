"""Centralized evaluation of a global adapter on the held-out split (with and without images)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from fedmllm.algorithms import server_peft
from fedmllm.config import ConfigError, typed, validate
from fedmllm.data import DatasetSettings, load_task
from fedmllm.data.collate import Collator
from fedmllm.data.schema import Sample, Task, modality
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
from fedmllm.models import get_model
from fedmllm.models.adapter import load_adapter_state
from fedmllm.partitioning.scenarios import apply_eval_scenario
from fedmllm.server.checkpoint import STAGE1_FILE, STATE_FILE, checkpoint_dir, read_state
from fedmllm.stages.cache import model_config, stage1_dir
from fedmllm.training import TrainSettings


def eval_options(ev: EvalSettings | dict[str, Any], dataset: DatasetSettings | dict[str, Any]) -> dict[str, Any]:
    """evaluate()'s settings from a run's `eval` section (and the dataset's FedMLLM letter range)."""
    ev = typed(EvalSettings, ev, "eval")
    out = {"mode": ev.mode, "max_new_tokens": ev.max_new_tokens, "protocol": ev.protocol}
    if ev.protocol == "fedmllm":
        letters = typed(DatasetSettings, dataset, "dataset").fedmllm_letters
        out["fedmllm"] = {**asdict(ev.fedmllm), "letters": letters}
    return out


def heldout_set(cfg: dict[str, Any]) -> tuple[Task, list[Sample]]:
    """(task, held-out samples) of a run config: `dataset.eval_samples` of the test split as the
    run's `prompt` phrases them, under `eval.scenario` (default: both modalities)."""
    ev = typed(EvalSettings, cfg["eval"], "eval")
    task, _, heldout = load_task(cfg["dataset"], cfg["seed"], cfg.get("prompt"))
    return task, apply_eval_scenario(heldout, ev.scenario, ev.mrate, cfg["seed"])


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
) -> dict[str, Any]:
    """Load `arrays` (if given) and evaluate the held-out samples twice: as they are, and with the
    image removed, so a reader sees how much of the accuracy comes from the image.

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


def save_predictions(out_dir, server_round: int, samples, arrays) -> Path:
    """Held-out predictions of a round: `<out_dir>/round-<N>.npz` with ids, labels and the
    evaluation's arrays (`scores` in eval.mode=score; `answers` and `pred` in eval.mode=generate)."""
    out = Path(out_dir) / f"round-{server_round}.npz"
    out.parent.mkdir(exist_ok=True)
    np.savez(out, ids=np.array([s["id"] for s in samples]), labels=np.array([s["label"] for s in samples]), **arrays)
    return out


def run_config(run_dir, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The config a run used (its config.yaml, fully resolved) with `overrides` (key=value, e.g.
    eval.mode=generate dataset.eval_samples=500) applied and validated; a key the run's config
    does not have fails naming it."""

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml; pass the 'run dir:' a fedmllm run printed")
    saved = OmegaConf.load(path)
    OmegaConf.set_struct(saved, True)
    try:
        merged = OmegaConf.merge(saved, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"{' '.join(overrides)}: {str(err).splitlines()[0]} (the run's settings are in {path})"
        ) from None
    return validate(OmegaConf.to_container(merged, resolve=True))


def evaluate_checkpoint(
    run_dir, server_round: int | None = None, overrides: list[str] | tuple[str, ...] = (), progress: bool = True
) -> dict[str, Any]:
    """Evaluate a run's checkpoint (the last intact round unless `server_round`) on its held-out
    split as the run did, or with `overrides` (another eval mode, protocol, scenario or sample
    count). Writes `<run dir>/eval/round-<N>.json` and the predictions beside it; returns the metrics
    with `round` and `checkpoint`."""

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    ckpt = checkpoint_dir(run_dir, server_round)
    server_round, payload, state = read_state(ckpt / STATE_FILE)
    fixed = {k[len("fixed/") :]: v for k, v in state.items() if k.startswith("fixed/")}
    model_cfg = model_config(cfg)
    if (ckpt / STAGE1_FILE).is_file():  # the checkpoint carries the stage-1 weights its base needs
        model_cfg["stage1_weights"] = str(ckpt / STAGE1_FILE)
    stage1 = stage1_dir(cfg)
    if stage1 is not None and not Path(model_cfg["stage1_weights"]).is_file():
        raise FileNotFoundError(
            f"the run's base model is its server's stage-1 result, {stage1}, which is neither in "
            "this machine's cache nor in the checkpoint; evaluate where the run ran"
        )
    lm = get_model(model_cfg, server_peft(cfg))
    task, heldout = heldout_set(cfg)
    bar = tqdm(total=len(heldout) * 2, desc=f"evaluate round {server_round}", file=sys.stderr, disable=not progress)
    metrics = evaluate(
        lm.model,
        Collator(lm.processor, lm.family, task),
        heldout,
        {**fixed, **payload},
        typed(TrainSettings, cfg["train"], "train").eval_batch_size,
        bar,
        **eval_options(cfg["eval"], cfg["dataset"]),
    )
    bar.close()
    out = save_predictions(run_dir / "eval", server_round, heldout, metrics.pop("_predictions")).with_suffix(".json")
    result = {
        "round": server_round,
        "checkpoint": f"checkpoints/round-{server_round}",
        "overrides": list(overrides),
        **metrics,
    }
    out.write_text(json.dumps(result, indent=1, default=float))
    return result
