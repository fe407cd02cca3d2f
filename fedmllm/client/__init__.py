"""Client side: one round of local training on this node's partition (no flwr here)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from fedmllm.config import NodeIdentity
from fedmllm.models import get_model
from fedmllm.models.stage1 import model_config
from fedmllm.models.adapter import adapter_state, load_adapter_state, payload_bytes, trainable_bytes


def local_data(cfg: dict[str, Any], ident: NodeIdentity):
    """(task, this node's training samples): read from node_config `data-dir` (a directory
    `fedmllm partition` wrote) when given, else built the same way from the configured dataset,
    partitioner and modality scenario."""
    from fedmllm.data import load_task
    from fedmllm.partitioning import client_partition
    from fedmllm.partitioning.materialise import read_client

    task, pool, _ = load_task(cfg["dataset"], cfg["seed"])
    if ident.data_dir:
        return task, read_client(ident.data_dir, cfg, ident.partition_id, ident.num_partitions)
    return task, client_partition(pool, cfg, ident.partition_id, ident.num_partitions)


def train_round(
    cfg: dict[str, Any],
    ident: NodeIdentity,
    arrays: dict[str, np.ndarray],
    server_round: int,
    proximal_mu: float = 0.0,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Load the global adapter, train `train.local_steps` steps, return (adapter, metrics).

    Every client replies with the same metric keys (Flower rejects inconsistent replies).
    """
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()

    from fedmllm.training import round_seed, train_steps
    from fedmllm.data.collate import Collator

    lm = get_model(model_config(cfg), cfg["peft"])
    load_adapter_state(lm.model, arrays)
    task, samples = local_data(cfg, ident)
    collator = Collator(lm.processor, lm.family, task)
    steps = cfg["train"]["local_steps"]
    t_setup = time.perf_counter() - t0
    bar = tqdm(total=steps, desc=f"client {ident.partition_id} round {server_round}", leave=False,
               file=sys.stderr, mininterval=2.0)
    seed = round_seed(cfg["seed"], server_round, ident.partition_id)
    if samples:
        result = train_steps(lm.model, collator, samples, cfg["train"], seed,
                             on_step=lambda s, loss: bar.update(1), proximal_mu=proximal_mu)
        out = adapter_state(lm.model)
    else:  # the global adapter back with weight 0: the strategy drops the reply (num-examples <= 0)
        print(f"client {ident.partition_id}: empty partition, nothing to train; replying num-examples 0",
              file=sys.stderr, flush=True)
        result = {"train-loss": float("nan"), "num-examples": 0}
        out = arrays
    bar.close()
    t_train = time.perf_counter() - t0 - t_setup
    metrics = {
        **result,
        "partition-id": ident.partition_id,
        "partition-size": len(samples),
        "empty-partition": int(not samples),
        "bytes-up": payload_bytes(out),
        "trainable-bytes": trainable_bytes(lm.model),
        "setup-seconds": t_setup,  # model (first round: load), adapter, data, partition
        "train-seconds": t_train,
    }
    return out, metrics
