"""Tiny model: 4-bit placement, adapter payload contract, collation and option scoring."""

import numpy as np
import pytest
import torch

from fedmllm.data import load_task
from fedmllm.data.collate import IGNORE, Collator
from fedmllm.evaluation.scoring import score_options
from fedmllm.models.adapter import adapter_state, load_adapter_state, payload_bytes, trainable_bytes


def test_only_the_language_model_is_quantized(tiny_lm):
    lm, cfg = tiny_lm
    quantized = [n for n, m in lm.model.named_modules() if type(m).__name__ == "Linear4bit"]
    if cfg["model"]["quantization"] == "none":
        assert quantized == []
        return
    assert quantized, "4-bit load produced no Linear4bit layers"
    for name in quantized:
        assert ".language_model." in name, name


def test_payload_is_exactly_the_trainable_adapter(tiny_lm):
    lm, _ = tiny_lm
    arrays = adapter_state(lm.model)
    assert arrays and all(a.dtype == np.float32 for a in arrays.values())
    # only LoRA tensors and the projector travel: no base weights, no embeddings, no vision tower
    for key in arrays:
        assert "lora_" in key or "multi_modal_projector" in key, key
        assert "embed_tokens" not in key and "vision_tower" not in key
    assert any("multi_modal_projector" in k for k in arrays)
    assert payload_bytes(arrays) == trainable_bytes(lm.model)
    n_trainable = sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
    assert payload_bytes(arrays) == 4 * n_trainable


def test_adapter_round_trip_and_key_check(tiny_lm):
    lm, _ = tiny_lm
    arrays = adapter_state(lm.model)
    changed = {k: v + 1.0 for k, v in arrays.items()}
    load_adapter_state(lm.model, changed)
    back = adapter_state(lm.model)
    for k in arrays:
        np.testing.assert_allclose(back[k], changed[k])
    load_adapter_state(lm.model, arrays)
    with pytest.raises(KeyError, match="adapter keys differ"):
        load_adapter_state(lm.model, {**arrays, "extra": np.zeros(1, np.float32)})


def test_labels_cover_only_the_answer_and_image_tokens_expand(tiny_lm):
    lm, cfg = tiny_lm
    task, train, _ = load_task(cfg["dataset"], cfg["seed"])
    col = Collator(lm.processor, lm.family, task)
    batch = col.train_batch(train[:4])
    image_id = lm.model.config.image_token_id
    v = cfg["model"]["vision"]
    per_image = (v["image_size"] // v["patch_size"]) ** 2
    assert ((batch["input_ids"] == image_id).sum(dim=1) == per_image).all()
    for row, s in enumerate(train[:4]):
        answer = [t for t in batch["labels"][row].tolist() if t != IGNORE]
        assert answer == col.answer_ids(task.labels[s["label"]])
    blind = col.train_batch(train[:4], drop_image=True)
    assert (blind["input_ids"] == image_id).sum() == 0 and "pixel_values" not in blind


def test_fast_option_scoring_equals_full_sequence_scoring(tiny_lm):
    lm, cfg = tiny_lm
    task, _, heldout = load_task(cfg["dataset"], cfg["seed"])
    col = Collator(lm.processor, lm.family, task)
    torch.manual_seed(1)
    arrays = {
        k: np.random.default_rng(0).normal(0, 0.5, v.shape).astype(np.float32)
        for k, v in adapter_state(lm.model).items()
    }
    load_adapter_state(lm.model, arrays)
    fast = score_options(lm.model, col, heldout[:8], batch_size=4)
    slow = score_options(lm.model, col, heldout[:8], batch_size=3, fast=False)
    assert fast.shape == (8, 2)
    np.testing.assert_allclose(fast, slow, atol=2e-3 if cfg["model"]["quantization"] == "4bit" else 1e-4)


def test_proximal_term_keeps_the_adapter_near_the_global_one(tiny_lm):
    from fedmllm.algorithms import algorithm_class
    from fedmllm.client.local import ClientStore, LocalRound
    from fedmllm.training import train_steps

    lm, cfg = tiny_lm
    task, train, _ = load_task(cfg["dataset"], cfg["seed"])
    col = Collator(lm.processor, lm.family, task)
    start = adapter_state(lm.model)
    drift = {}
    for mu in (0.0, 100.0):
        local = LocalRound(algorithm_class("fedprox")(), lm.model, start, {}, ClientStore(), 0, 0, proximal_mu=mu)
        local.prepare()  # loads the global adapter, anchors the proximal term at it
        train_steps(
            lm.model,
            col,
            train[:32],
            dict(cfg["train"], local_steps=4, lr=1e-2),
            seed=0,
            penalty=local.penalty if local.has_penalty else None,
        )
        end = adapter_state(lm.model)
        drift[mu] = sum(float(((end[k] - start[k]) ** 2).sum()) for k in start)
    load_adapter_state(lm.model, start)
    assert drift[100.0] < drift[0.0]


def test_train_steps_runs_every_local_step_unless_stop_says_so(tiny_lm):
    """A client's progress callback (tqdm's update returns True when it redraws) never ends local
    training; only `stop()` does (the server's adapter pre-training uses it)."""
    from fedmllm.training import train_steps

    lm, cfg = tiny_lm
    start = adapter_state(lm.model)
    task, train, _ = load_task(cfg["dataset"], cfg["seed"])
    col = Collator(lm.processor, lm.family, task)
    train_cfg = dict(cfg["train"], local_steps=3, batch_size=2)
    seen: list[int] = []
    try:
        full = train_steps(lm.model, col, train[:16], train_cfg, seed=0, on_step=lambda s, _: seen.append(s) or True)
        assert seen == [0, 1, 2] and full["num-examples"] == 6
        seen.clear()
        early = train_steps(
            lm.model,
            col,
            train[:16],
            train_cfg,
            seed=0,
            on_step=lambda s, _: seen.append(s),
            stop=lambda: len(seen) == 2,
        )
        assert seen == [0, 1] and early["num-examples"] == 4
    finally:
        load_adapter_state(lm.model, start)
