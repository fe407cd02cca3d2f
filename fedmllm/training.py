"""Adapter training steps shared by clients (local training) and the server (global alignment); imports no flwr."""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import numpy as np

from fedmllm.data.collate import Collator
from fedmllm.data.schema import Sample
from fedmllm.models.device import to_model


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of one client's batches in one round: distinct per round and client, fixed by `seed`."""
    return seed * 100_003 + server_round * 1009 + partition_id


def batches(samples: list[Sample], batch_size: int, steps: int, seed: int):
    """`steps` batches drawn without replacement, reshuffling each pass over the data."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(samples)))
            rng.shuffle(fresh)
            order += fresh
        yield [samples[i] for i in order[:batch_size]]
        del order[:batch_size]


def make_optimizer(model, train_cfg: dict[str, Any]):
    """AdamW with two groups: LoRA tensors at `lr`, the fully trained projector at `projector_lr`
    (a gentler rate: at 1e-3 a prototype's projector never learned to carry image information)."""
    import torch

    lora, full = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (full if "modules_to_save" in name else lora).append(p)
    groups = [{"params": lora, "lr": float(train_cfg["lr"])}]
    if full:
        groups.append({"params": full, "lr": float(train_cfg.get("projector_lr", train_cfg["lr"]))})
    return torch.optim.AdamW(groups, weight_decay=float(train_cfg.get("weight_decay", 0.0)))


def answer_loss(model, inputs: dict[str, Any]):
    """Mean cross-entropy over the answer tokens, computing logits for the last `keep` positions only."""
    import torch.nn.functional as F

    inputs = to_model(inputs, model)
    labels, keep = inputs.pop("labels"), inputs.pop("keep")
    logits = model(**inputs, logits_to_keep=keep).logits  # [B, keep, V]
    # position t predicts token t+1: the last keep-1 labels come from the first keep-1 logits
    pred = logits[:, :-1].float()
    target = labels[:, -(keep - 1):]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100)


def train_steps(
    model,
    collator: Collator,
    samples: list[Sample],
    train_cfg: dict[str, Any],
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    stop: Callable[[], bool] | None = None,
    penalty: Callable[[], Any] | None = None,
    after_backward: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train `train_cfg.local_steps` steps; returns mean train loss and examples seen.

    `on_step(step, loss)` runs after each step, then `stop()`: True ends training there (the
    server's adapter pre-training stops once its held-out accuracy is reached).

    `penalty()` is added to each step's loss (FedProx, adaptive regularization);
    `after_backward()` runs between backward and the optimizer step (SCAFFOLD's correction).
    """
    import torch

    if not samples:
        raise ValueError("this client's partition is empty: lower num_clients or raise partitioner.alpha")
    steps, bs = int(train_cfg["local_steps"]), int(train_cfg["batch_size"])
    torch.manual_seed(seed)
    model.train()
    opt = make_optimizer(model, train_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for step, batch in enumerate(batches(samples, bs, steps, seed)):
        inputs = collator.train_batch(batch)
        loss = answer_loss(model, inputs)
        if penalty is not None:
            loss = loss + penalty()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite loss {loss.item()} at local step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        if train_cfg.get("max_grad_norm"):
            torch.nn.utils.clip_grad_norm_(params, float(train_cfg["max_grad_norm"]))
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
        if stop is not None and stop():
            break
    model.eval()
    return {"train-loss": float(np.mean(losses)), "num-examples": len(losses) * bs}
