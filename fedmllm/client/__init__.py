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
    """(task, this node's training samples) from the configured dataset and partitioner."""
    from fedmllm.data import load_task
    from fedmllm.partitioning import client_samples

    task, pool, _ = load_task(cfg["dataset"], cfg["seed"], cfg.get("prompt"))
    samples = client_samples(pool, cfg["partitioner"], ident.partition_id, ident.num_partitions, cfg["seed"])
    return task, samples


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
    result = train_steps(lm.model, collator, samples, cfg["train"], seed,
                         on_step=lambda s, loss: bar.update(1), proximal_mu=proximal_mu)
    bar.close()
    t_train = time.perf_counter() - t0 - t_setup
    out = adapter_state(lm.model)
    metrics = {
        **result,
        "partition-id": ident.partition_id,
        "partition-size": len(samples),
        "bytes-up": payload_bytes(out),
        "trainable-bytes": trainable_bytes(lm.model),
        "setup-seconds": t_setup,  # model (first round: load), adapter, data, partition
        "train-seconds": t_train,
    }
    return out, metrics
