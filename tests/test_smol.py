"""smol-llava smoke test: the real SmolLM2 inside LLaVA, 4-bit, one train step and scoring."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from fedmllm.config import compose
    from fedmllm.models import clear_cache, get_model

    cfg = compose(["train.local_steps=2", "train.batch_size=4"])
    lm = get_model(cfg["model"], cfg["peft"])
    yield lm, cfg
    clear_cache()


def test_language_model_weights_are_the_real_smollm2(smol):
    lm, _ = smol
    tok = lm.processor.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad(), lm.model.disable_adapter():
        out = lm.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_smol_llava_is_4bit_trains_and_scores(smol):
    lm, cfg = smol
    from fedmllm.data import load_task
    from fedmllm.data.collate import Collator
    from fedmllm.evaluation.scoring import score_options
    from fedmllm.models.adapter import adapter_state, payload_bytes, trainable_bytes
    from fedmllm.training import train_steps

    assert any(type(m).__name__ == "Linear4bit" for m in lm.model.modules())
    task, train, heldout = load_task(cfg["dataset"], cfg["seed"])
    col = Collator(lm.processor, lm.family, task)
    before = adapter_state(lm.model)
    result = train_steps(lm.model, col, train[:64], cfg["train"], seed=0)
    after = adapter_state(lm.model)
    assert np.isfinite(result["train-loss"]) and result["num-examples"] == 8
    assert any(not np.allclose(before[k], after[k]) for k in before)
    # LoRA r=16 on the seven linear layers of 30 blocks (the preset's lora_leaves) + the projector:
    # 30 x 16 x (1152 + 768 + 768 + 1152 + 3 x 2112) = 4,884,480 + 480,384 params, fp32
    assert payload_bytes(after) == trainable_bytes(lm.model) == 4 * (4_884_480 + 480_384)
    scores = score_options(lm.model, col, heldout[:8], batch_size=8)
    assert scores.shape == (8, 2) and np.isfinite(scores).all()


def test_smol_llava_generate_mode_answers_yes_or_no(smol):
    lm, cfg = smol
    from fedmllm.data import load_task
    from fedmllm.data.collate import Collator
    from fedmllm.server.evaluate import evaluate

    task, _, heldout = load_task(cfg["dataset"], cfg["seed"])
    col = Collator(lm.processor, lm.family, task)
    m = evaluate(lm.model, col, heldout[:8], None, batch_size=8, mode="generate", max_new_tokens=4)
    saved = m.pop("_predictions")
    assert len(saved["answers"]) == 8 and saved["pred"].shape == (8,)
    # SmolLM2-Instruct follows "Answer yes or no." (4-bit, PEFT-wrapped, left-padded batch)
    assert m["unparsed"] < 8, saved["answers"]
    assert 0 <= m["accuracy"] <= 1 and m["eval_samples_both"] == 8
