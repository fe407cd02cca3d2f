"""The server stage's CPU shortcuts give the plain computation's results: a text batch's shared
prompt prefix run once (losses, gradients and option scores), 4-bit weights dequantized once."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import loss_and_grads, tiny_lora

from fedmllm.models.families import FAMILIES


def _setup(family: str, quant: str = "4bit"):
    """A tiny model of `family` with LoRA (B non-zero), its collator, and six captioned public
    questions (text only, as in the adapter pre-training)."""
    from fedmllm.stages.captions import load_public_captioned

    model, collator, cfg = tiny_lora(family, quant)
    return model, collator, load_public_captioned(cfg["dataset"], cfg["seed"])[:6]


def _close(a, b, rtol=1e-4):
    for x, y in zip(a, b):
        assert float((x - y).norm()) <= rtol * (float(x.norm()) + 1e-8), (float(x.norm()), float(y.norm()))


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_gives_the_plain_loss_gradients_and_scores(family):
    from fedmllm.evaluation.scoring import score_options
    from fedmllm.training import shared_prefix_logits

    model, collator, samples = _setup(family)
    batch = collator.train_batch(samples)
    model.train()
    plain_loss, plain_grads = loss_and_grads(model, batch)
    shared_loss, shared_grads = loss_and_grads(model, batch, share_prefix=True)
    assert np.isclose(shared_loss, plain_loss, rtol=1e-5), (shared_loss, plain_loss)
    _close(plain_grads, shared_grads)
    assert any(float(g.abs().sum()) > 0 for g in plain_grads)

    # The shortcut runs exactly where the batch is input ids + attention mask; the families whose
    # text batches carry token types (PaliGemma, Qwen) take the plain forward.
    text_only = set(batch) - {"labels", "keep"} == {"input_ids", "attention_mask"}
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "keep")}
    assert (shared_prefix_logits(model, inputs, batch["keep"]) is not None) == text_only

    scores = score_options(model, collator, samples, batch_size=6)
    np.testing.assert_allclose(
        score_options(model, collator, samples, batch_size=6, share_prefix=True), scores, rtol=1e-5, atol=1e-5
    )


def test_shared_prefix_splits_where_the_rows_differ_and_declines_short_prefixes():
    import torch

    from fedmllm.training import shared_prefix_logits

    model, collator, samples = _setup("llava", quant="none")
    model.eval()
    batch = collator.prompt_batch(samples)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        plain = model(**batch, logits_to_keep=3).logits
        shared = shared_prefix_logits(model, dict(batch), keep=3)
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5)
    # rows whose first tokens differ share no prefix: the caller's plain forward runs
    rows = ids.clone()
    first = int((mask[0] == 0).sum())
    rows[0, first] = (rows[0, first] + 1) % 50
    assert shared_prefix_logits(model, {"input_ids": rows, "attention_mask": mask}, keep=3) is None
    # images (or any other input) are never cut
    assert shared_prefix_logits(model, {**batch, "pixel_values": torch.zeros(1)}, keep=3) is None


def test_dequantized_weights_give_the_same_step_and_are_restored():
    from fedmllm.models.quantize import dequantized

    model, collator, samples = _setup("llava")
    bnb = pytest.importorskip("bitsandbytes")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    batch = collator.train_batch(samples)
    model.train()
    loss, grads = loss_and_grads(model, batch)
    with dequantized(model):
        assert all("forward" in vars(m) for m in layers)
        fast_loss, fast_grads = loss_and_grads(model, batch)
        both_loss, both_grads = loss_and_grads(model, batch, share_prefix=True)
    assert not any("forward" in vars(m) for m in layers)  # the 4-bit path is back
    assert np.isclose(fast_loss, loss, rtol=1e-6) and np.isclose(both_loss, loss, rtol=1e-5)
    _close(grads, fast_grads, rtol=1e-5)
    _close(grads, both_grads)
    with pytest.raises(RuntimeError, match="boom"):
        with dequantized(model):
            raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in layers)  # restored on failure too
    assert np.isclose(loss_and_grads(model, batch)[0], loss, rtol=1e-6)


def test_answer_accuracy_counts_rows_whose_every_answer_token_is_the_top_prediction():
    import torch

    from fedmllm.training import answer_loss

    model, collator, samples = _setup("llava", quant="none")
    model.eval()
    batch = collator.train_batch(samples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Relabel the answers: rows 0-2 get the model's own top predictions (right), rows 3-5 one token
    # off in their last answer token (wrong), so exactly half the rows count.
    labels = batch["labels"].clone()
    for row in range(labels.shape[0]):
        where = (labels[row] != -100).nonzero().flatten()  # answer tokens, predicted one position earlier
        labels[row, where] = logits[row, where - 1].argmax(-1)
        if row >= 3:
            labels[row, where[-1]] = (labels[row, where[-1]] + 1) % logits.shape[-1]
    stats: dict[str, float] = {}
    with torch.no_grad():
        answer_loss(model, {**batch, "labels": labels}, stats=stats)
    assert stats["answer_accuracy"] == pytest.approx(0.5)
