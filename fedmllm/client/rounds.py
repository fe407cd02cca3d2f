"""One client's round on this node's partition: training (`train_round`), evaluation of its own
held-out split (`evaluate_round`), and `train_request`, which runs either for a `TrainRequest`
(no flwr here; the ClientApp or the node's worker calls it)."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedmllm import data as sources  # sources.load_task is looked up on each call (tests replace it)
from fedmllm.algorithms import adaptive_reg_settings, algorithm_of
from fedmllm.client.local import ClientStore, LocalRound, client_state_path
from fedmllm.client.request import TrainRequest
from fedmllm.conf import run_settings
from fedmllm.config import NodeIdentity, from_run_config, node_identity, typed
from fedmllm.data import task_for
from fedmllm.data.collate import Collator
from fedmllm.evaluation.heldout import eval_options, evaluate
from fedmllm.faults import byzantine
from fedmllm.models import get_model
from fedmllm.models.adapter import payload_bytes, save_peft, trainable_bytes
from fedmllm.models.load import resolve_path
from fedmllm.partitioning import client_partition
from fedmllm.partitioning.materialise import read_client, read_task
from fedmllm.stages.cache import model_config
from fedmllm.training import TrainSettings, optimizer_steps, round_lr, round_seed, train_steps
from fedmllm.transport import MODEL, RESIDUAL, compress_update, decode_download, is_encoded, settings_of


def train_request(req: TrainRequest):
    """Compose the config, run the client's round: (adapter, metrics, extra records, state to keep).
    An evaluate request (`req.evaluate`) evaluates instead: ({}, metrics, {}, state)."""

    ident = node_identity(req.node_config)
    cfg = from_run_config(req.run_config, req.base_overrides)
    server_round = int(req.config["server-round"])
    if req.evaluate:  # the state as this round's training left it (a state file of this round counts)
        store = ClientStore(req.state, client_state_path(cfg, ident.partition_id), server_round + 1)
        return {}, evaluate_round(cfg, ident, req.arrays, server_round, req.extra, store), {}, store.flat
    store = ClientStore(req.state, client_state_path(cfg, ident.partition_id), server_round)
    arrays = req.arrays
    if is_encoded(arrays):  # transport.down_codec: the new adapter's difference from the one this client holds
        arrays = decode_download(arrays, store.get(MODEL), settings_of(cfg).block)
        store.put(MODEL, arrays)
    out, metrics, extra_out = train_round(
        cfg,
        ident,
        arrays,
        server_round,
        float(req.config.get("proximal-mu", 0.0)),
        req.extra,
        store,
    )
    return out, metrics, extra_out, store.flat


def local_data(cfg: dict[str, Any], ident: NodeIdentity):
    """(task, this node's training samples): read from node_config `data-dir` (a directory
    `fedmllm partition` wrote; images under `image-root`) when given, and then nothing else of the
    dataset is read (the task comes from the directory's task.json); else built the same way from
    the configured dataset, partitioner and modality scenario. Under aggregator=centralized
    (`pooled`) the training partition holds every partition's samples, each with its scenario."""

    run = run_settings(cfg)
    ids = range(ident.num_partitions) if algorithm_of(cfg).pooled else [ident.partition_id]
    if ident.data_dir:
        task = read_task(ident.data_dir)
        task = (
            task_for(task, run.dataset, run.prompt)
            if task is not None
            else sources.load_task(run.dataset, run.seed, run.prompt)[0]
        )  # a partition from before task.json
        return task, [
            s for i in ids for s in read_client(ident.data_dir, cfg, i, ident.num_partitions, ident.image_root)
        ]
    task, pool, _ = sources.load_task(run.dataset, run.seed, run.prompt)
    return task, [s for i in ids for s in client_partition(pool, cfg, i, ident.num_partitions)]


def hold_out(samples: list, fraction: float, seed: int, partition_id: int) -> tuple[list, list]:
    """(train, test) of a client's samples: `fraction` of them (at least one, never all) drawn with
    the run's seed and the partition id for the client's own evaluation (eval.client_fraction);
    ([samples], []) when the fraction is 0 or there are fewer than two samples."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    k = min(len(samples) - 1, max(1, round(fraction * len(samples))))
    test = set(np.random.default_rng([seed, partition_id, 0xE7A1]).choice(len(samples), k, replace=False).tolist())
    return [s for i, s in enumerate(samples) if i not in test], [s for i, s in enumerate(samples) if i in test]


def personal_dir(cfg: dict[str, Any], partition_id: int) -> Path | None:
    """Where a client saves its personal adapter (PEFT format), beside its state files."""
    path = client_state_path(cfg, partition_id)
    return path.with_name(f"partition-{partition_id}-personal") if path is not None else None


EVAL_KEYS = ("accuracy", "macro_f1")  # what a client's evaluation reply carries besides its counts


def evaluate_round(
    cfg: dict[str, Any],
    ident: NodeIdentity,
    arrays: dict[str, np.ndarray],
    server_round: int,
    extra: dict[str, dict[str, np.ndarray]] | None = None,
    store: ClientStore | None = None,
) -> dict[str, float]:
    """Evaluate the model this client would train from (the global adapter; a `personal`
    algorithm's with what the client keeps) on the client's held-out split (eval.client_fraction):
    metrics accuracy, macro_f1, num-examples (held-out samples; 0: nothing to evaluate) and
    partition-id, the same keys from every client. A personal model is also saved, PEFT format,
    in the client's state directory (`personal_dir`)."""
    algorithm = algorithm_of(cfg)
    run = run_settings(cfg)
    pid = ident.partition_id
    empty = {**{k: float("nan") for k in EVAL_KEYS}, "num-examples": 0, "partition-id": pid}
    if algorithm.sits_out(pid):
        return empty
    task, samples = local_data(cfg, ident)
    _, test = hold_out(samples, float(run.eval.client_fraction), run.seed, pid)
    if not test:
        return empty
    lm = get_model(model_config(cfg), algorithm.client_peft(cfg, pid, ident.lora_rank))
    if store is None:
        store = ClientStore(path=client_state_path(cfg, pid), server_round=server_round + 1)
    local = LocalRound(
        algorithm, lm.model, arrays, extra or {}, store, run.seed, round_seed(run.seed, server_round, pid)
    )
    local.prepare_evaluation()
    collator = Collator(lm.processor, lm.family, task)
    bar = tqdm(total=len(test), desc=f"client {pid} eval round {server_round}", leave=False, file=sys.stderr)
    metrics = evaluate(
        lm.model,
        collator,
        test,
        None,
        run.train.eval_batch_size,
        bar,
        blind=False,
        **eval_options(run.eval, run.dataset),
    )
    bar.close()
    if algorithm.personal and (out := personal_dir(cfg, pid)) is not None:
        save_peft(lm.model, out, base=resolve_path(cfg["model"]))
    return {
        **{k: float(metrics.get(k, float("nan"))) for k in EVAL_KEYS},
        "num-examples": len(test),
        "partition-id": pid,
    }


def sit_out_metrics(partition_id: int) -> dict[str, Any]:
    """The reply of a client with nothing to train (the same metric keys as a trained one's)."""
    return {
        "train-loss": float("nan"),
        "num-examples": 0,
        "examples-seen": 0,
        "partition-id": partition_id,
        "partition-size": 0,
        "empty-partition": 1,
        "bytes-up": 0,
        "lora-rank": 0,
        "trainable-bytes": 0,
        "setup-seconds": 0.0,
        "train-seconds": 0.0,
        "image-tokens": 0.0,
        "text-tokens": 0.0,
    }


def aggregation_weight(train: TrainSettings | dict[str, Any], partition_size: int, examples_seen: int) -> int:
    """A reply's `num-examples`, by `train.weight_by`: `partition_size` (default) weights each
    client by its dataset size, as FedMLLM (OpenFedLLM's sample_num_list) and Flower's strategies
    do; `examples_seen` by local_steps x batch_size, the same for every client with data."""
    how = typed(TrainSettings, train, "train").weight_by
    return 0 if not partition_size else (partition_size if how == "partition_size" else examples_seen)


def train_round(
    cfg: dict[str, Any],
    ident: NodeIdentity,
    arrays: dict[str, np.ndarray],
    server_round: int,
    proximal_mu: float = 0.0,
    extra: dict[str, dict[str, np.ndarray]] | None = None,
    store=None,
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """Load the global adapter, train the round's steps (`train.local_steps`, or `local_epochs`
    passes over the partition), return (adapter, metrics, extra).

    `extra` holds the message's other array records (SCAFFOLD's server control variate), and the
    returned extra the reply's (SCAFFOLD's dc, FedSA-LoRA's B for evaluation); `store` is what
    this client keeps across rounds (fedmllm.client.local.ClientStore).
    Every client replies with the same metric keys (Flower rejects inconsistent replies).
    """

    t0 = time.perf_counter()
    algorithm = algorithm_of(cfg)
    if algorithm.sits_out(ident.partition_id):  # local/centralized baseline: another partition trains
        print(
            f"client {ident.partition_id}: sits out (aggregator={algorithm.name} trains another partition "
            "alone); replying num-examples 0",
            file=sys.stderr,
            flush=True,
        )
        return arrays, sit_out_metrics(ident.partition_id), {}

    rank = algorithm.client_rank(cfg, ident.partition_id, ident.lora_rank)
    lm = get_model(model_config(cfg), algorithm.client_peft(cfg, ident.partition_id, ident.lora_rank))
    if store is None:
        store = ClientStore(path=client_state_path(cfg, ident.partition_id), server_round=server_round)
    run = run_settings(cfg)
    seed = round_seed(run.seed, server_round, ident.partition_id)
    local = LocalRound(
        algorithm,
        lm.model,
        arrays,
        extra or {},
        store,
        run.seed,
        seed,
        proximal_mu,
        adaptive_reg_settings(cfg, algorithm),
        lm.model.config.get_text_config().num_hidden_layers,
    )
    local.prepare()
    task, samples = local_data(cfg, ident)
    samples, _ = hold_out(samples, float(run.eval.client_fraction), run.seed, ident.partition_id)
    collator = Collator(lm.processor, lm.family, task)
    train = round_lr(run.train, server_round, run.num_rounds)  # the round's lr (round_schedule)
    if algorithm.pooled and not train.local_epochs:  # centralized: the federation's steps per round
        train = replace(train, local_steps=int(train.local_steps) * int(run.clients_per_round))
    steps = optimizer_steps(train, len(samples))
    t_setup = time.perf_counter() - t0
    bar = tqdm(
        total=steps,
        desc=f"client {ident.partition_id} round {server_round}",
        leave=False,
        file=sys.stderr,
        mininterval=2.0,
    )
    if samples:
        result = train_steps(
            lm.model,
            collator,
            samples,
            train,
            seed,
            on_step=lambda s, loss: bar.update(1),
            penalty=local.penalty if local.has_penalty else None,
            after_backward=local.after_backward,
        )
        out, extra_out = local.finish()
        if run.faults.attacks(ident.partition_id):  # a Byzantine client (faults.byzantine, experiments)
            out = byzantine(out, arrays, run.faults, seed)
        transport = settings_of(cfg)
        if transport.up:  # the update travels encoded; what encoding lost waits for the next round
            out, residual = compress_update(out, arrays, transport, store.get(RESIDUAL))
            if residual is not None:
                store.put(RESIDUAL, residual)
    else:  # the global adapter back with weight 0: the strategy drops the reply (num-examples <= 0)
        print(
            f"client {ident.partition_id}: empty partition, nothing to train; replying num-examples 0",
            file=sys.stderr,
            flush=True,
        )
        local.release()
        result = {"train-loss": float("nan"), "num-examples": 0}
        out, extra_out = arrays, {}
    seen = result["num-examples"]
    bar.close()
    t_train = time.perf_counter() - t0 - t_setup
    metrics = {
        **result,
        # the aggregation weight: the partition's size (FedMLLM's sample_num_list, Flower's
        # convention), or with train.weight_by=examples_seen the samples trained on this round
        "num-examples": aggregation_weight(train, len(samples), seen),
        "examples-seen": seen,
        "partition-id": ident.partition_id,
        "partition-size": len(samples),
        "empty-partition": int(not samples),
        "bytes-up": payload_bytes(out) + sum(payload_bytes(a) for a in extra_out.values()),
        "lora-rank": rank,
        "trainable-bytes": trainable_bytes(lm.model),
        "setup-seconds": t_setup,  # model (first round: load), adapter, data, partition
        "train-seconds": t_train,
    }
    # tokens per trained sample, image and text apart (the token budget: model.max_pixels, ...)
    metrics["image-tokens"], metrics["text-tokens"] = collator.tokens_per_sample()
    return out, metrics, extra_out
