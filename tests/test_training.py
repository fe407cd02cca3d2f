"""The client's training regime: gradient accumulation, checkpointing, learning-rate schedules
within and across rounds (FedMLLM's), optimizer steps per local epoch."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import loss_and_grads, tiny_lora


def _tiny(quant: str, family: str = "llava"):
    """Tiny model with LoRA (B non-zero), collator, training pool, config."""
    from fedmllm.data import load_task

    model, collator, cfg = tiny_lora(family, quant)
    _, pool, _ = load_task(cfg["dataset"], cfg["seed"])
    return model, collator, pool, cfg


@pytest.mark.parametrize("quant", ["4bit", "none"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(quant):
    """Non-reentrant checkpointing under a frozen (4-bit) base: the same loss and gradients,
    LoRA gradients included (the input-grad hook a reentrant checkpoint would need is not)."""
    model, col, pool, _ = _tiny(quant)
    batch = col.train_batch(pool[:4])
    model.train()
    plain_loss, plain = loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        ckpt_loss, ckpt = loss_and_grads(model, batch)
    finally:
        model.gradient_checkpointing_disable()
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert any(float(g.norm()) > 0 for g in plain)
    for a, b in zip(plain, ckpt):
        # the same ops recomputed: equal up to float rounding (measured 0.0 here; 1e-5 is slack)
        assert float((a - b).norm()) <= 1e-5 * (float(a.norm()) + 1e-8)


def test_train_steps_with_checkpointing_leaves_the_model_as_it_was():
    from fedmllm.training import train_steps

    model, col, pool, cfg = _tiny("4bit")
    result = train_steps(
        model, col, pool[:16], {**cfg["train"], "local_steps": 1, "gradient_checkpointing": True}, seed=0
    )
    assert math.isfinite(result["train-loss"])
    assert not model.is_gradient_checkpointing and not model.training


def test_accumulating_two_batches_of_two_is_one_batch_of_four():
    """With the same samples (the stream draws the same order), one step of batch 4 and one of two
    accumulated batches of 2 apply the same update where every row has as many answer tokens."""
    import copy

    from fedmllm.models.adapter import adapter_state
    from fedmllm.training import train_steps

    model, col, pool, cfg = _tiny("none")
    start = copy.deepcopy(adapter_state(model))
    base = {**cfg["train"], "local_steps": 1, "max_grad_norm": 0.0}
    same = [s for s in pool if s["label"] == 1][:12]  # one answer: as many answer tokens in every row
    one = train_steps(model, col, same, {**base, "batch_size": 4}, seed=3)
    after_one = adapter_state(model)
    from fedmllm.models.adapter import load_adapter_state

    load_adapter_state(model, start)
    two = train_steps(model, col, same, {**base, "batch_size": 2, "grad_accum": 2}, seed=3)
    after_two = adapter_state(model)
    assert one["num-examples"] == two["num-examples"] == 4
    assert two["train-loss"] == pytest.approx(one["train-loss"], rel=1e-5)
    moved = [k for k in start if not np.array_equal(start[k], after_one[k])]
    assert moved
    for k in moved:
        np.testing.assert_allclose(after_two[k], after_one[k], rtol=1e-4, atol=1e-7, err_msg=k)


def test_lr_factor_is_transformers_cosine_schedule_with_warmup():
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from fedmllm.training import lr_factor

    for total, ratio in [(10, 0.01), (57, 0.1), (3, 0.0)]:
        warm = math.ceil(ratio * total)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = get_cosine_schedule_with_warmup(opt, warm, total)
        theirs = []
        for _ in range(total):
            theirs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        ours = [lr_factor(s, total, "cosine", ratio) for s in range(total)]
        np.testing.assert_allclose(ours, theirs, atol=1e-12)
    assert [lr_factor(s, 4, "constant", 0.5) for s in range(4)] == [0.0, 0.5, 1.0, 1.0]


def test_round_lr_is_fedmllms_cosine_warm_learning_rate():
    from fedmllm.training import round_lr

    def theirs(last_round, base_lr, total_rounds, warmup_rounds=None, eta_min=0.0):
        # FedMLLM's cosine_warm_learning_rate, transcribed (utils in 1xbq1/FedMLLM)
        if last_round < warmup_rounds:
            return base_lr * (last_round + 1) / warmup_rounds
        return (
            eta_min
            + (base_lr - eta_min)
            * (1 + math.cos(math.pi * (last_round - warmup_rounds) / (total_rounds - warmup_rounds)))
            / 2.0
        )

    cfg = {"lr": 2e-5, "projector_lr": 1e-5, "round_schedule": "cosine_warm", "round_warmup": 0.01}
    for r in range(1, 51):
        got = round_lr(cfg, r, 50)
        assert got.lr == pytest.approx(theirs(r - 1, 2e-5, 50, 0.5), rel=1e-12)
        assert got.projector_lr == pytest.approx(theirs(r - 1, 1e-5, 50, 0.5), rel=1e-12)
    assert round_lr(cfg, 1, 50).lr == pytest.approx(4e-5)  # warm-up of half a round: twice the base
    assert round_lr({**cfg, "round_schedule": "constant"}, 7, 50).lr == 2e-5


def test_one_local_epoch_is_floor_of_samples_over_accumulated_batch():
    from fedmllm.training import optimizer_steps

    fedmllm = {"local_steps": 99, "local_epochs": 1, "batch_size": 1, "grad_accum": 4}
    assert optimizer_steps(fedmllm, 10) == 2  # the last 2 samples' gradients are never applied
    assert optimizer_steps(fedmllm, 3) == 1  # at least one step, as transformers' Trainer
    assert optimizer_steps({**fedmllm, "local_epochs": 2}, 10) == 4
    assert optimizer_steps({**fedmllm, "local_epochs": None}, 10) == 99
