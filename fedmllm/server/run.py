"""Server side of a run: initial adapter, strategy, centralized evaluation, checkpoints, logs."""

from __future__ import annotations

import functools
import json
import random
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from fedmllm.algorithms import algorithm_of, strategy_settings
from fedmllm.conf import run_settings
from fedmllm.data import load_public
from fedmllm.data.collate import Collator
from fedmllm.models import clear_cache, get_model
from fedmllm.models.adapter import adapter_state
from fedmllm.models.load import resolve_path
from fedmllm.records import from_record, to_record
from fedmllm.server.checkpoint import (
    latest_state,
    prune_checkpoints,
    save_checkpoint,
    save_strategy_state,
    write_manifest,
)
from fedmllm.server.evaluate import eval_options, evaluate, heldout_set, save_predictions
from fedmllm.stages.adapter import ensure_adapter_pretrained, format_adapter_summary
from fedmllm.stages.align import Aligner
from fedmllm.stages.cache import WEIGHTS, model_config
from fedmllm.stages.vision import ensure_pretrained, format_summary
from fedmllm.strategies.private import private_strategy
from fedmllm.strategies.secure import secure_start
from fedmllm.strategies.wrapper import AdapterStrategy
from fedmllm.tracking import MetricsLog, format_round, plot_run, read_metrics
from fedmllm.transport import settings_of


def default_run_dir() -> Path:
    return Path.cwd() / "outputs" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")


def build_strategy(cfg: dict[str, Any], **settings):
    """The algorithm's Flower strategy, with the `aggregator` section's settings and the sampled
    fraction following clients_per_round, behind Flower's DP wrapper when `privacy` is on
    (strategies.private), inside strategies.wrapper.AdapterStrategy (reply checks;
    `settings`: its fixed, round_offset, post_aggregate, on_round)."""
    algorithm = algorithm_of(cfg)
    kwargs = strategy_settings(cfg["aggregator"])
    checks = {k: kwargs.pop(k) for k in ("max_update_norm", "max_num_examples") if k in kwargs}
    run = run_settings(cfg)
    kwargs.setdefault("fraction_train", run.clients_per_round / run.num_clients)
    # the server evaluates the global adapter itself; with eval.client_fraction every client also
    # evaluates its own model on its held-out split, every eval_every rounds and the last
    kwargs.setdefault("fraction_evaluate", 1.0 if run.eval.client_fraction > 0 else 0.0)
    strategy = algorithm.strategy_class()(**kwargs)
    if run.privacy.enabled:  # Flower's central-DP wrapper over it (fedmllm.privacy)
        strategy = private_strategy(
            strategy,
            run.privacy,
            sample_size=run.clients_per_round,
            population=run.num_clients,
            num_rounds=run.num_rounds,
            seed=run.seed,
        )
    every, last = run.eval_every, run.num_rounds
    return AdapterStrategy(
        strategy,
        free_rank=algorithm.free_rank,
        transport=settings_of(cfg),
        client_eval=(lambda r: r % every == 0 or r == last) if run.eval.client_fraction > 0 else None,
        **checks,
        **settings,
    )


def run_server(grid, cfg: dict[str, Any]) -> Path:
    """Run all rounds on `grid`; returns the run directory."""
    import torch

    run = run_settings(cfg)
    run_dir = Path(run.out_dir) if run.out_dir else default_run_dir()
    resumed = None
    if run.resume:  # everything checked before anything of the stopped run is touched
        check_resumable(Path(run.resume), cfg)
        resumed = latest_state(Path(run.resume))
        if resumed[0] >= run.num_rounds:
            raise ResumeError(f"{run.resume} already finished {resumed[0]} rounds; raise num_rounds to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), run_dir / "config.yaml")

    stage1 = ensure_pretrained(cfg)
    if stage1 is not None:
        (run_dir / "stage1.json").write_text(json.dumps(stage1, indent=1))
        if stage1["cached"]:
            print(f"stage 1: cached ({stage1['dir']}); {format_summary(stage1)}", flush=True)
    # Seeded after stage 1, which draws from both generators only when it is not cached yet.
    random.seed(run.seed)  # Flower samples nodes with `random`
    torch.manual_seed(run.seed)  # LoRA A init: the same initial adapter for the same seed
    # A fresh model per run: a sweep runs its jobs in this one process, and a cached model would
    # hand the next job the last job's adapter as its "initial" one.
    clear_cache()
    algorithm = algorithm_of(cfg)
    lm = get_model(model_config(cfg), algorithm.server_peft(cfg))
    task, heldout = heldout_set(cfg)
    collator = Collator(lm.processor, lm.family, task)
    algorithm.prepare_server_model(lm.model, run.seed)  # FFA-LoRA: the A every client derives from the seed
    adapter = None if run.resume else ensure_adapter_pretrained(cfg, lm, collator)
    if adapter is not None:
        (run_dir / "stage1_adapter.json").write_text(json.dumps(adapter, indent=1))
        if adapter["cached"]:
            print(f"stage 1 adapter: cached ({adapter['dir']}); {format_adapter_summary(adapter)}", flush=True)
    full = adapter_state(lm.model)
    initial = algorithm.shared_payload(full)
    fixed = {k: v for k, v in full.items() if k not in initial}  # FFA: A; FedSA: B (until clients report)
    done, state = 0, None
    if resumed is not None:
        done, initial, state = resumed
        print(f"resuming {run.resume} after round {done} of {run.num_rounds}", flush=True)
        keep_rows_until(run_dir, done)  # a round logged after the last intact checkpoint runs again
    aligner = Aligner(cfg, lm, collator, load_public(run.dataset, run.seed)) if run.server_stage.align.enabled else None
    last = {}  # the RoundStats of the round being evaluated (the wrapper reports it before evaluate_fn)
    strategy = build_strategy(
        cfg, fixed=fixed, round_offset=done, post_aggregate=aligner, on_round=lambda stats: last.update(stats=stats)
    )
    if run.privacy.enabled:
        print(strategy.strategy.describe(run.num_rounds), flush=True)
    if state is not None:
        strategy.load_state_arrays(state)  # the stopped run's server state (optimizer moments, c, fixed)
    # what each checkpoint names as its base, and carries besides the adapter (stage 1's tower + projector)
    base_name = resolve_path(cfg["model"])
    stage1_files = (Path(stage1["dir"]) / WEIGHTS,) if stage1 is not None else ()
    # rows logged so far (a resumed run's included), for keep_best's best round: read once
    history = logged_rows(run_dir) if run.keep_best else []
    mlog = MetricsLog(run_dir, run.logger, cfg)
    t0 = time.time()
    n_rounds = run.num_rounds
    bar = tqdm(total=n_rounds, initial=done, desc="rounds", unit="round", file=sys.stderr)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if done and server_round == 0:
            return None  # the resumed round was evaluated and logged by the stopped run
        server_round += done
        shared = from_record(arrays)
        payload = strategy.full_payload(shared)
        row: dict[str, Any] = {"round": server_round}
        stats = last.pop("stats", None) if server_round > 0 else None
        if stats is not None:
            row.update(
                train_loss=stats.train_loss,
                bytes_up=stats.bytes_up,
                bytes_down=stats.bytes_down,
                bytes_up_per_client={str(k): v for k, v in stats.bytes_up_per_client.items()},
                clients=stats.clients,  # per reply: partition-id, num-examples, train-loss, bytes, dropped
                **stats.extra,  # flora_truncation_error; align_seconds, align_loss; epsilon; client_accuracy_*
            )
            if stats.client_eval:  # each client's accuracy on its own held-out split
                row["client_eval"] = stats.client_eval
        else:
            row.update(train_loss=None, bytes_up=0, bytes_down=0, bytes_up_per_client={}, clients=[])
        if server_round == 0 and stage1 is not None:
            row.update(pretrain_seconds=stage1["seconds"], pretrain_cached=stage1["cached"])
            if adapter is not None:
                row.update(pretrain_adapter_seconds=adapter["seconds"], pretrain_adapter_cached=adapter["cached"])
        if server_round % run.eval_every == 0 or server_round in (0, n_rounds):
            ebar = tqdm(total=len(heldout) * 2, desc=f"eval round {server_round}", leave=False, file=sys.stderr)
            metrics = evaluate(
                lm.model,
                collator,
                heldout,
                payload,
                run.train.eval_batch_size,
                ebar,
                **eval_options(run.eval, run.dataset),
            )
            ebar.close()
            save_predictions(run_dir / "predictions", server_round, heldout, metrics.pop("_predictions"))
            row.update(metrics)
        ckpt = save_checkpoint(
            lm.model, payload, run_dir, server_round, base=base_name, processor=lm.processor, files=stage1_files
        )
        save_strategy_state(ckpt, server_round, shared, strategy.state_arrays())
        write_manifest(ckpt)  # last: resume trusts a round only when its files match it
        best = None
        if run.keep_best:
            history.append(row)
            best = best_round(history)
        prune_checkpoints(run_dir, run.keep_checkpoints, best)
        row["checkpoint"] = str(ckpt.relative_to(run_dir))
        row["seconds"] = round(time.time() - t0, 2)
        mlog.log(row)
        if server_round > 0:
            bar.update(1)
        tqdm.write(format_round(row), file=sys.stdout)
        sys.stdout.flush()
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    train_config = ConfigRecord({"seed": run.seed})
    # under secure aggregation each round's training goes through Flower's SecAgg+ workflow
    start = functools.partial(secure_start, strategy, run.secagg) if run.secure_aggregation else strategy.start
    try:
        start(
            grid=grid,
            initial_arrays=to_record(initial),
            num_rounds=n_rounds - done,
            timeout=float(run.round_timeout),
            train_config=train_config,
            evaluate_fn=evaluate_fn,
        )
    finally:
        bar.close()
        mlog.close()
        if mlog.rows:
            plot_run(run_dir)
    if n_rounds > done and strategy.rounds_aggregated == 0:
        reasons = sorted({reason for _, reason in strategy.dropped})
        raise NoRoundAggregated(
            f"no round of {n_rounds - done} aggregated: every round had fewer valid replies than "
            f"min_train_nodes={strategy.min_train_nodes}"
            + (f"; replies were dropped for: {'; '.join(reasons[:3])}" if reasons else "")
        )
    print(f"server finished; results in {run_dir}", flush=True)
    return run_dir


def logged_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows metrics.jsonl holds so far (a resumed run's included), [] before the first."""

    return read_metrics(run_dir) if (Path(run_dir) / "metrics.jsonl").is_file() else []


def best_round(rows: list[dict[str, Any]]) -> int | None:
    """The trained round with the highest held-out accuracy (the earliest of equals), or None."""
    scored = [
        (r["accuracy"], -r["round"])
        for r in rows
        if r.get("round", 0) > 0 and isinstance(r.get("accuracy"), (int, float))
    ]
    return -max(scored)[1] if scored else None


class ResumeError(ValueError):
    """`resume=` cannot continue that run as asked (nothing of it is changed)."""


class NoRoundAggregated(RuntimeError):
    """A run ended without one aggregated round: its result is the initial adapter."""


# What a resumed run must share with the stopped one: a different value would continue the
# stopped run's adapter, strategy state and client state under other settings.
RESUME_FIXED = ("model", "peft", "dataset", "partitioner", "scenario", "prompt", "aggregator", "num_clients", "seed")


def check_resumable(run_dir: Path, cfg: dict[str, Any]) -> None:
    """Raise ResumeError, naming each setting that differs, when `cfg` would continue `run_dir`
    under another model, PEFT, dataset, partition, scenario, prompt, aggregator, clients or seed."""

    if not run_dir.is_dir():
        raise ResumeError(f"resume={run_dir}: no such directory; pass the 'run dir:' a stopped run printed")
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    diffs = []
    for key in RESUME_FIXED:
        for name, (old, new) in _differences(saved.get(key), cfg.get(key), key).items():
            if name.endswith(".eval_samples"):
                continue  # the held-out sample count may change between runs
            if name == "aggregator._target_" or (name == "aggregator.module" and old is None):
                continue  # a run from before fedmllm.algorithms: its name selected the same strategy
            diffs.append(f"{name}: {old!r} -> {new!r}")
    if diffs:
        raise ResumeError(
            f"resume={run_dir} ran with other settings; resuming would mix them: {'; '.join(diffs[:4])}"
            f"{' ...' if len(diffs) > 4 else ''}. Drop those overrides, or start a new run"
        )


def _differences(old: Any, new: Any, prefix: str) -> dict[str, tuple[Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for k in sorted(set(old) | set(new)):
            out.update(_differences(old.get(k), new.get(k), f"{prefix}.{k}"))
        return out
    return {} if old == new else {prefix: (old, new)}


def keep_rows_until(run_dir: Path, last_round: int) -> None:
    """Rewrite metrics.jsonl without the rows of rounds after `last_round` (atomically)."""

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("round", 0) <= last_round:
                kept.append(line)
        except ValueError:
            continue  # a line cut by the interruption
    if len(kept) != len(lines):
        tmp = path.with_name("tmp-" + path.name)
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
