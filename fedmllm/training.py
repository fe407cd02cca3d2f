"""Adapter training steps shared by clients (local training) and the server (global alignment); imports no flwr."""

from __future__ import annotations

import inspect
import math
import random
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, List, Optional

import numpy as np
from tqdm.auto import tqdm

from fedmllm.config import Number, integer, need, number, typed
from fedmllm.data.collate import Collator
from fedmllm.data.schema import Sample
from fedmllm.models.device import to_model

SCHEDULES = ("constant", "cosine")  # within a round
ROUND_SCHEDULES = ("constant", "cosine_warm")  # across rounds (FedMLLM's cosine_warm_learning_rate)
WEIGHT_BY = ("partition_size", "examples_seen")


@dataclass
class AdaptiveRegSettings:
    """`train.adaptive_reg`: FedMLLM's modality-agnostic adaptive regularization."""

    enabled: bool = False
    mu: Number = 0.01
    mu_w: Number = 0.1
    s_layer: int = 4

    def __post_init__(self) -> None:
        need(
            integer(self.s_layer) and self.s_layer >= 0,
            f"train.adaptive_reg.s_layer={self.s_layer!r} must be an integer >= 0",
        )


@dataclass
class TrainSettings:
    """`train`: the clients' local training (fedmllm/conf/train/*.yaml say what each does)."""

    local_steps: int = 6
    weight_by: str = "partition_size"
    batch_size: int = 8
    grad_accum: int = 1
    local_epochs: Optional[int] = None
    schedule: str = "constant"
    warmup_ratio: Number = 0.0
    round_schedule: str = "constant"
    round_warmup: Number = 0.01
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    gradient_checkpointing: bool = False
    share_prefix: bool = False  # set by the server's adapter stage on the CPU (answer_loss), not a yaml key
    lr: Number = 1e-3
    projector_lr: Number = 2e-4
    weight_decay: Number = 0.0
    max_grad_norm: Number = 1.0
    eval_batch_size: int = 32
    adaptive_reg: AdaptiveRegSettings = field(default_factory=AdaptiveRegSettings)

    def __post_init__(self) -> None:
        for key in ("local_steps", "batch_size"):
            v = getattr(self, key)
            need(integer(v) and v >= 1, f"train.{key}={v!r} must be an integer >= 1")
        for key in ("lr", "projector_lr"):
            v = getattr(self, key)
            need(number(v) and 0 < v < float("inf"), f"train.{key}={v!r} must be a finite number > 0")
        need(
            integer(self.grad_accum) and self.grad_accum >= 1,
            f"train.grad_accum={self.grad_accum!r} must be an integer >= 1",
        )
        ep = self.local_epochs
        need(
            ep is None or (integer(ep) and ep >= 1),
            f"train.local_epochs={ep!r} must be null (use train.local_steps) or an integer >= 1",
        )
        need(self.schedule in SCHEDULES, f"train.schedule={self.schedule!r}: choose constant or cosine")
        need(
            self.round_schedule in ROUND_SCHEDULES,
            f"train.round_schedule={self.round_schedule!r}: choose constant or cosine_warm (FedMLLM's)",
        )
        for key in ("warmup_ratio", "round_warmup"):
            v = getattr(self, key)
            need(number(v) and 0 <= v < 1, f"train.{key}={v!r} must be a number in [0, 1) (e.g. 0.01)")
        betas = self.adam_betas
        need(
            isinstance(betas, (list, tuple)) and len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas),
            f"train.adam_betas={betas!r} must be two numbers in [0, 1), e.g. [0.9,0.95]",
        )
        need(
            self.weight_by in WEIGHT_BY,
            f"train.weight_by={self.weight_by!r}: choose partition_size (each client's dataset size, "
            "FedMLLM's weighting) or examples_seen (local_steps x batch_size)",
        )


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


# The client loop's regime settings at their plain values: the server's stages train with these,
# whatever a run sets for its clients (FedMLLM's accumulation and schedules are client settings).
PLAIN_LOOP = {
    "grad_accum": 1,
    "local_epochs": None,
    "schedule": "constant",
    "warmup_ratio": 0.0,
    "round_schedule": "constant",
    "adam_betas": [0.9, 0.999],
    "gradient_checkpointing": False,
}


def round_lr(train: TrainSettings | dict[str, Any], server_round: int, num_rounds: int) -> TrainSettings:
    """`train` with `lr` and `projector_lr` for round `server_round` (1-based) of `num_rounds`.

    `round_schedule=cosine_warm` is FedMLLM's `cosine_warm_learning_rate(r, lr, R, R * round_warmup)`
    at r = server_round - 1: lr (r+1)/W during the W warm-up rounds, then
    lr (1 + cos(pi (r - W) / (R - W))) / 2. With R=50 and round_warmup=0.01, W=0.5: round 1 runs at
    2 lr (their round 0 at 4e-5), round 2 at 0.9996 lr, round 50 at 1e-3 lr."""
    train = typed(TrainSettings, train, "train")
    if train.round_schedule == "constant":
        return train
    r, warm = server_round - 1, num_rounds * float(train.round_warmup)
    if r < warm:
        factor = (r + 1) / warm
    else:
        factor = (1 + math.cos(math.pi * (r - warm) / (num_rounds - warm))) / 2
    return replace(train, lr=float(train.lr) * factor, projector_lr=float(train.projector_lr) * factor)


def lr_factor(step: int, total: int, schedule: str = "constant", warmup_ratio: float = 0.0) -> float:
    """Multiplier of the learning rate at optimizer step `step` (0-based) of `total` in a round,
    as transformers' `get_cosine_schedule_with_warmup` with ceil(warmup_ratio x total) warm-up
    steps (its first step, with warm-up, runs at 0): linear up, then cosine down to 0."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={schedule!r}: choose constant or cosine")
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return step / max(1, warm)
    if schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def optimizer_steps(train: TrainSettings | dict[str, Any], num_samples: int) -> int:
    """Optimizer steps of a local round: `local_steps`, or with `local_epochs` that many passes over
    the client's data, each floor(n / (batch_size x grad_accum)) steps and at least one (as
    transformers' Trainer, which FedMLLM runs for one epoch: the gradients of a last incomplete
    accumulation are never applied)."""
    train = typed(TrainSettings, train, "train")
    if not train.local_epochs:
        return int(train.local_steps)
    return int(train.local_epochs) * max(1, num_samples // (int(train.batch_size) * int(train.grad_accum)))


def make_optimizer(model, train: TrainSettings):
    """AdamW with two groups: LoRA tensors at `lr`, the fully trained projector at `projector_lr`
    (a gentler rate: at 1e-3 a prototype's projector never learned to carry image information);
    betas `adam_betas` (FedMLLM: 0.9, 0.95)."""
    import torch

    lora, full = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (full if "modules_to_save" in name else lora).append(p)
    groups = [{"params": lora, "lr": float(train.lr)}]
    if full:
        groups.append({"params": full, "lr": float(train.projector_lr)})
    for g in groups:
        g["initial_lr"] = g["lr"]  # what the round's schedule scales
    betas = tuple(float(b) for b in train.adam_betas)
    return torch.optim.AdamW(groups, weight_decay=float(train.weight_decay), betas=betas)


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
    target = labels[:, -(keep - 1) :]
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
    out = model(
        input_ids=head, attention_mask=torch.ones_like(head, dtype=mask.dtype), use_cache=True, logits_to_keep=1
    )
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
    return model(
        input_ids=rest,
        attention_mask=full_mask,
        position_ids=position,
        use_cache=True,
        logits_to_keep=keep,
        **{cache_arg: cache},
    ).logits


class StepBar:
    """A progress bar over optimizer steps (on stderr) that keeps every step's loss: `bar(step, loss)`
    after each step; every `every` steps it shows the mean of the last `every` losses and `extra()`."""

    def __init__(self, desc: str, total: int, every: int, extra: Callable[[], dict] | None = None):

        self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, mininterval=2.0)
        self.every, self.extra = every, extra
        self.losses: list[float] = []

    def __call__(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        self.bar.update(1)
        if step % self.every == 0:
            self.show()

    def show(self, **more) -> None:
        extra = self.extra() if self.extra is not None else {}
        self.bar.set_postfix(loss=f"{np.mean(self.losses[-self.every :]):.3f}", **{**extra, **more})

    def close(self) -> None:
        self.bar.close()


def optimize(
    opt,
    params: list,
    steps: int,
    micro_loss: Callable[[int], Any],
    *,
    accum: int = 1,
    lr_at: Callable[[int], float] | None = None,
    max_grad_norm: float | None = None,
    after_backward: Callable[[], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    stop: Callable[[], bool] | None = None,
    what: str = "local step",
) -> list[float]:
    """The one optimization loop (clients' rounds, the server's stages): for each of `steps` steps,
    set every param group's lr to its `initial_lr` x `lr_at(step)`, sum the gradients of `accum`
    losses `micro_loss(step)` (each divided by accum; a non-finite one raises FloatingPointError
    naming `what` and the step), run `after_backward()`, clip `params` to `max_grad_norm`, step,
    then `on_step(step, loss)` and `stop()` (True ends training). Returns each step's loss."""
    import torch

    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    losses: list[float] = []
    for step in range(steps):
        if lr_at is not None:
            factor = lr_at(step)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            loss = micro_loss(step)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite loss {loss.item()} at {what} {step}")
            (loss / accum).backward()
            total += loss.item() / accum
        if after_backward is not None:
            after_backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, float(max_grad_norm))
        opt.step()
        losses.append(total)
        if on_step is not None:
            on_step(step, total)
        if stop is not None and stop():
            break
    return losses


def train_steps(
    model,
    collator: Collator,
    samples: list[Sample],
    train: TrainSettings | dict[str, Any],
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    stop: Callable[[], bool] | None = None,
    on_answers: Callable[[int, float], None] | None = None,
    penalty: Callable[[], Any] | None = None,
    after_backward: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train `optimizer_steps(train, len(samples))` steps; returns mean train loss and examples seen.

    A step accumulates `grad_accum` batches of `batch_size` (the loss of each divided by
    grad_accum, as transformers does), then clips and steps at the learning rate of `schedule`
    (constant | cosine, `warmup_ratio`) within the round. `gradient_checkpointing` recomputes
    each layer's activations in the backward pass (non-reentrant, so a frozen 4-bit base needs no
    input-grad hook), for the duration of the call.

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
    train = typed(TrainSettings, train, "train")
    steps, bs, accum = optimizer_steps(train, len(samples)), int(train.batch_size), int(train.grad_accum)
    torch.manual_seed(seed)
    checkpointing = bool(train.gradient_checkpointing)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = make_optimizer(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    stream = batches(samples, bs, steps * accum, seed)
    share_prefix = bool(train.share_prefix)
    right: list[float] = []  # this step's batch answer accuracies (on_answers)

    def micro_loss(step: int):
        stats: dict[str, float] | None = {} if on_answers is not None else None
        loss = answer_loss(model, collator.train_batch(next(stream)), share_prefix=share_prefix, stats=stats)
        if stats is not None:
            right.append(stats["answer_accuracy"])
        return loss + penalty() if penalty is not None else loss

    def stepped(step: int, loss: float) -> None:
        if on_answers is not None:
            on_answers(step, float(np.mean(right)))
            right.clear()
        if on_step is not None:
            on_step(step, loss)

    try:
        losses = optimize(
            opt,
            params,
            steps,
            micro_loss,
            accum=accum,
            lr_at=lambda step: lr_factor(step, steps, train.schedule, float(train.warmup_ratio)),
            max_grad_norm=train.max_grad_norm,
            after_backward=after_backward,
            on_step=stepped,
            stop=stop,
        )
    finally:
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
    return {"train-loss": float(np.mean(losses)), "num-examples": len(losses) * bs * accum}
