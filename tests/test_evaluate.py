"""Held-out evaluation on tiny-llava: score and generate modes, per-modality breakdown, eval config."""

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from fedmllm.config import ConfigError, compose
from fedmllm.data.schema import modality
from fedmllm.evaluation.generation import generate_answers, parse_predictions
from fedmllm.evaluation.metrics import UNPARSED
from fedmllm.server.evaluate import evaluate


@pytest.fixture(scope="module")
def tiny():
    """(LoadedModel, collator, 12 held-out samples: 3 each with both modalities, image only, text only, none)."""
    from fedmllm.data import load_task
    from fedmllm.data.collate import Collator
    from fedmllm.models import clear_cache, get_model

    cfg = compose(tiny_overrides())
    torch.manual_seed(0)
    lm = get_model(cfg["model"], cfg["peft"])
    task, _, heldout = load_task(cfg["dataset"], cfg["seed"])
    samples = []
    for k, s in enumerate(heldout[:12]):
        drop = ("both", "image", "text", "none")[k % 4]  # the group the sample ends up in
        samples.append(
            {
                **s,
                "image": None if drop in ("text", "none") else s["image"],
                "text": None if drop in ("image", "none") else s["text"],
            }
        )
    yield lm, Collator(lm.processor, lm.family, task), samples
    clear_cache()


class HeadBias:
    """Context manager: while active, `bias(hidden, logits)` edits the LM head's logits."""

    def __init__(self, lm):
        self.head = lm.model.get_output_embeddings()

    def bias(self, hidden, logits):
        raise NotImplementedError

    def __enter__(self):
        self.handle = self.head.register_forward_hook(lambda mod, args, out: self.bias(args[0], out.clone()))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class force_answer(HeadBias):
    """Greedy decoding spells `word`, one token per forward pass (tiny-llava's 400-token vocab
    splits "yes" into 2 tokens): generate with max_new_tokens = len(self.ids)."""

    def __init__(self, lm, collator, word: str):
        super().__init__(lm)
        self.ids, self.calls = collator.tokenizer(word, add_special_tokens=False)["input_ids"], 0

    def bias(self, hidden, logits):
        logits[..., self.ids[self.calls % len(self.ids)]] += 1e3
        self.calls += 1
        return logits


class split_answers(HeadBias):
    """Token `a` or `b` by which side of `threshold` the last hidden state's feature `dim` lies:
    a prompt-dependent answer, so a padding mistake shows."""

    def __init__(self, lm, a: int, b: int, dim: int, threshold: float):
        super().__init__(lm)
        self.a, self.b, self.dim, self.threshold = a, b, dim, threshold

    def bias(self, hidden, logits):
        s = 1e3 * (hidden[..., self.dim] - self.threshold)
        logits[..., self.a] += s
        logits[..., self.b] -= s
        return logits


def test_groups_of_the_fixture_samples(tiny):
    _, _, samples = tiny
    assert [modality(s) for s in samples[:4]] == ["both", "image", "text", "none"]


def test_score_mode_reports_each_modality_group(tiny):
    lm, col, samples = tiny
    m = evaluate(lm.model, col, samples, None, batch_size=12)
    scores = m.pop("_predictions")["scores"]
    labels = np.array([s["label"] for s in samples])
    hit = scores.argmax(axis=1) == labels
    for k, g in enumerate(("both", "image", "text", "none")):
        assert m[f"accuracy_{g}"] == pytest.approx(hit[k::4].mean())
        assert m[f"eval_samples_{g}"] == 3 and 0 <= m[f"macro_f1_{g}"] <= 1
    assert m["accuracy"] == pytest.approx(hit.mean())
    assert "accuracy_no_image" in m and "unparsed" not in m


def test_generate_mode_parses_greedy_answers_into_hard_predictions(tiny):
    lm, col, samples = tiny
    labels = np.array([s["label"] for s in samples])
    assert set(labels.tolist()) == {0, 1}  # both classes: auroc is defined
    force = force_answer(lm, col, "yes")
    with force:
        m = evaluate(lm.model, col, samples, None, batch_size=12, mode="generate", max_new_tokens=len(force.ids))
    saved = m.pop("_predictions")
    assert saved["answers"].tolist() == ["yes"] * 12
    assert saved["pred"].tolist() == [1] * 12 and m["unparsed"] == 0
    assert m["accuracy"] == pytest.approx((labels == 1).mean())
    assert m["auroc"] == 0.5  # a constant hard prediction ranks nothing (FedMLLM's AUROC on labels)
    assert m["accuracy_none"] == pytest.approx((labels[3::4] == 1).mean())
    assert m["no_image_unparsed"] == 0 and "accuracy_no_image" in m

    # Untouched, the random tiny model answers whitespace: unparsed, and counted as wrong.
    m = evaluate(lm.model, col, samples, None, batch_size=12, mode="generate", max_new_tokens=2)
    saved = m.pop("_predictions")
    assert saved["pred"].tolist() == parse_predictions(list(saved["answers"]), col.task.labels).tolist()
    n_unparsed = int((saved["pred"] == UNPARSED).sum())
    assert n_unparsed > 0 and m["unparsed"] == n_unparsed
    assert m["accuracy"] == pytest.approx((saved["pred"] == labels).mean())


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(tiny):
    lm, col, samples = tiny
    # The last prompt position's hidden state per prompt, one prompt at a time (no padding).
    states = []
    handle = lm.model.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: states.append(args[0][0, -1].detach().clone())
    )
    try:
        for s in samples:
            generate_answers(lm.model, col, [s], max_new_tokens=1)
    finally:
        handle.remove()
    h = torch.stack(states)
    dim = int(h.var(dim=0).argmax())
    v = h[:, dim].sort().values
    threshold = float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2  # half the prompts on each side
    a, b = (col.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
    with split_answers(lm, a, b, dim, threshold):
        batched = generate_answers(lm.model, col, samples, max_new_tokens=1, batch_size=12)
        single = [generate_answers(lm.model, col, [s], max_new_tokens=1)[0] for s in samples]
    assert len(set(batched)) == 2, batched  # the prompts (of different lengths) differ in answer
    assert batched == single


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="eval.mode='beam': choose one of score, generate"):
        evaluate(None, None, [], None, mode="beam")


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["eval.mode=beam"], "eval.mode='beam': choose score or generate"),
        (["eval.max_new_tokens=0"], "eval.max_new_tokens=0 must be an integer >= 1"),
    ],
)
def test_bad_eval_config_is_named(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        compose(overrides)


def test_eval_defaults_to_score_mode():
    cfg = compose(["eval.mode=generate", "eval.max_new_tokens=4"])
    assert (cfg["eval"]["mode"], cfg["eval"]["max_new_tokens"]) == ("generate", 4)
    assert compose()["eval"]["mode"] == "score"


def test_fedmllm_protocol_samples_answers_and_reads_them_with_their_regex(tiny):
    """eval.protocol=fedmllm: sampled answers, FedMLLM's regex, index 2 for an answer that names
    no option, AUROC on those hard predictions (roc_auc_score(labels, pred), 2 included)."""
    from sklearn.metrics import roc_auc_score

    lm, col, samples = tiny
    labels = np.array([s["label"] for s in samples])
    opts = {"temperature": 0.7, "top_p": 0.8, "top_k": 100, "repetition_penalty": 1.05, "seed": 0, "letters": None}
    force = force_answer(lm, col, "B")
    with force:
        m = evaluate(
            lm.model,
            col,
            samples,
            None,
            batch_size=12,
            mode="generate",
            max_new_tokens=len(force.ids),
            protocol="fedmllm",
            fedmllm=opts,
        )
    saved = m.pop("_predictions")
    assert saved["answers"].tolist() == ["B"] * 12 and saved["pred"].tolist() == [1] * 12
    assert m["accuracy"] == pytest.approx((labels == 1).mean()) and m["unparsed"] == 0
    force = force_answer(lm, col, "yes")  # names no letter: FedMLLM's fallback, index 2
    with force:
        m = evaluate(
            lm.model,
            col,
            samples,
            None,
            batch_size=12,
            mode="generate",
            max_new_tokens=len(force.ids),
            protocol="fedmllm",
            fedmllm=opts,
        )
    saved = m.pop("_predictions")
    assert saved["pred"].tolist() == [2] * 12 and m["unparsed"] == 12 and m["accuracy"] == 0
    assert m["auroc"] == roc_auc_score(labels, [2] * 12) == 0.5
    with pytest.raises(ValueError, match="eval.protocol=fedmllm with eval.mode=generate"):
        evaluate(lm.model, col, samples, None, mode="score", protocol="fedmllm", fedmllm=opts)


def test_fedmllm_protocol_needs_generate_mode_in_the_config():
    with pytest.raises(ConfigError, match="eval.protocol=fedmllm reads generated answers.*add eval.mode=generate"):
        compose(["eval.protocol=fedmllm"])
    cfg = compose(["eval.protocol=fedmllm", "eval.mode=generate"])
    assert cfg["eval"]["fedmllm"]["temperature"] == 0.7
