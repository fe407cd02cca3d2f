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


def answer_loss(model, inputs: dict[str, Any], share_prefix: bool = False, stats: dict[str, float] | None = None):
    """Mean cross-entropy over the answer tokens, computing logits for the last `keep` positions only.

    `share_prefix`: in a text-only batch (input ids and attention mask, no images), run the tokens
    that begin every row (chat template, instruction) once and reuse their keys and values for
    the whole batch (shared_prefix_logits); the same loss and gradients, fewer tokens.
    `stats`: filled with `answer_accuracy`, the fraction of rows whose every answer token is the
    model's top prediction (teacher-forced greedy decoding), from this same forward pass."""
    import torch.nn.functional as F

    inputs = to_model(inputs, model)
    labels, keep = inputs.pop("labels"), inputs.pop("keep")
    logits = shared_prefix_logits(model, inputs, keep) if share_prefix else None
    if logits is None:
        logits = model(**inputs, logits_to_keep=keep).logits  # [B, keep, V]
    # position t predicts token t+1: the last keep-1 labels come from the first keep-1 logits
    pred = logits[:, :-1].float()
    target = labels[:, -(keep - 1):]
    if stats is not None:
        right = (pred.detach().argmax(-1) == target) | (target == -100)
        stats["answer_accuracy"] = float(right.all(1).float().mean())
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100)


def shared_prefix_logits(model, inputs: dict[str, Any], keep: int, min_prefix: int = 4):
    """Logits of the last `keep` positions of a left-padded, text-only batch, running the tokens
    that every row begins with once: their keys and values, computed for one row, are repeated for
    the batch, and each row's remaining tokens attend to them (the same causal attention, so the
    same logits and gradients: the prefix's LoRA sees the gradient of every row through the shared
    cache). Returns None, and the caller runs the plain forward, when the batch carries more than
    input ids and an attention mask (images, token types), the shared prefix is shorter than
    `min_prefix` tokens, or the model's forward takes no cache argument.

    The server's adapter pre-training trains on captions as text: 17 of its 49 tokens per row are
    the chat template and the caption's "The image shows a", about a third of every step."""
    import inspect

    import torch

    if set(inputs) != {"input_ids", "attention_mask"}:
        return None
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows, width = ids.shape
    lengths = mask.sum(1)
    starts = width - lengths  # left padding: row i's tokens are ids[i, starts[i]:]
    if bool((mask.gather(1, starts.clamp(max=width - 1)[:, None]) == 0).any()) or int(lengths.min()) <= keep:
        return None  # not left-padded as the collator pads, or too short to split
    span = torch.arange(int(lengths.min()) - keep, device=ids.device)
    aligned = ids.gather(1, starts[:, None] + span)  # each row's first tokens, before any label
    same = (aligned == aligned[:1]).all(0).int().cumprod(0)
    prefix = int(same.sum())
    if prefix < min_prefix:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    if cache_arg is None:
        return None
    head = aligned[:1, :prefix]
    out = model(input_ids=head, attention_mask=torch.ones_like(head, dtype=mask.dtype), use_cache=True,
                logits_to_keep=1)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(rows)
    # the rest of each row, still left-padded: columns from `cut` on hold every row's remainder
    cut = int(starts.min()) + prefix
    rest = ids[:, cut:]
    column = torch.arange(cut, width, device=ids.device)[None, :]
    own = column >= (starts + prefix)[:, None]  # this row's tokens after the prefix (not padding)
    rest_mask = (mask[:, cut:].bool() & own).to(mask.dtype)
    position = (column - starts[:, None]).clamp(min=prefix) * own + prefix * ~own
    full_mask = torch.cat([torch.ones(rows, prefix, dtype=mask.dtype, device=mask.device), rest_mask], 1)
    return model(input_ids=rest, attention_mask=full_mask, position_ids=position, use_cache=True,
                 logits_to_keep=keep, **{cache_arg: cache}).logits


def train_steps(
    model,
    collator: Collator,
    samples: list[Sample],
    train_cfg: dict[str, Any],
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    stop: Callable[[], bool] | None = None,
    on_answers: Callable[[int, float], None] | None = None,
    penalty: Callable[[], Any] | None = None,
    after_backward: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train `train_cfg.local_steps` steps; returns mean train loss and examples seen.

    `on_step(step, loss)` runs after each step, then `stop()`: True ends training there (the
    server's adapter pre-training stops once its held-out accuracy is reached).
    `on_answers(step, accuracy)` runs before `on_step` with the step's batch answer accuracy,
    measured by its own forward pass, before the update that learns from it (answer_loss's stats).

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
        stats: dict[str, float] | None = {} if on_answers is not None else None
        loss = answer_loss(model, inputs, share_prefix=bool(train_cfg.get("share_prefix")), stats=stats)
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
        if on_answers is not None:
            on_answers(step, stats["answer_accuracy"])
        if on_step is not None:
            on_step(step, losses[-1])
        if stop is not None and stop():
            break
    model.eval()
    return {"train-loss": float(np.mean(losses)), "num-examples": len(losses) * bs}
