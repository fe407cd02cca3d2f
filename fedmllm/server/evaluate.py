"""Centralized evaluation of a global adapter on the held-out split (with and without images)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from fedmllm.algorithms import server_peft
from fedmllm.config import ConfigError, typed, validate
from fedmllm.data import load_task
from fedmllm.data.collate import Collator
from fedmllm.data.schema import Sample, Task
from fedmllm.evaluation import EvalSettings
from fedmllm.evaluation.heldout import eval_options, evaluate
from fedmllm.evaluation.scoring import score_options
from fedmllm.models import get_model
from fedmllm.partitioning.scenarios import apply_eval_scenario
from fedmllm.server.checkpoint import STAGE1_FILE, STATE_FILE, checkpoint_dir, read_state
from fedmllm.stages.cache import model_config, stage1_dir
from fedmllm.training import TrainSettings


def heldout_set(cfg: dict[str, Any]) -> tuple[Task, list[Sample]]:
    """(task, held-out samples) of a run config: `dataset.eval_samples` of the test split as the
    run's `prompt` phrases them, under `eval.scenario` (default: both modalities)."""
    ev = typed(EvalSettings, cfg["eval"], "eval")
    task, _, heldout = load_task(cfg["dataset"], cfg["seed"], cfg.get("prompt"))
    return task, apply_eval_scenario(heldout, ev.scenario, ev.mrate, cfg["seed"])


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
